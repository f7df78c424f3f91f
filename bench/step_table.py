"""The step benchmark's derived columns (memory against explicit attention, speed-up against the
release-equivalent step) and its table."""

from __future__ import annotations


def add_comparisons(rows: list[dict]) -> None:
    """``mem_vs_explicit``: step peak over the same row with explicit attention; ``speedup_vs_ref``: the
    release-equivalent row's step time (fp32, explicit, eager, no checkpointing; through the loader, the
    PIL augmentation's row when there is one) over this row's."""

    def key(r: dict, **changes) -> tuple:
        d = {**r, **changes}
        return (d["recipe"], d["arch"], d["batch"], d["crops"], d["precision"], d["compile"],
                d["attention"], d["checkpointing"], d.get("augment", "random"))  # fmt: skip

    by_key = {key(r): r for r in rows}
    for r in rows:
        explicit = by_key.get(key(r, attention="explicit", checkpointing=False))
        release = {"precision": "fp32", "compile": False, "attention": "explicit", "checkpointing": False}
        ref = by_key.get(key(r, **release, augment="pil")) or by_key.get(key(r, **release))
        r["mem_vs_explicit"] = r["step_peak_mib"] / explicit["step_peak_mib"] if explicit else None
        r["speedup_vs_ref"] = ref["step_s"] / r["step_s"] if ref else None


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per configuration from the rows of several rounds (each round: the same configurations in
    the same order): the round with the median step time (the lower middle one of an even count), with
    every round's step time and speed-up kept beside it, and the comparisons taken between the medians."""
    merged = []
    for same in zip(*rounds, strict=True):
        row = dict(sorted(same, key=lambda r: r["step_s"])[(len(same) - 1) // 2])
        if len(same) > 1:
            row["step_s_rounds"] = [r["step_s"] for r in same]
            row["speedup_vs_ref_rounds"] = [r.get("speedup_vs_ref") for r in same]
        merged.append(row)
    add_comparisons(merged)
    return merged


def print_rounds(rows: list[dict]) -> None:
    """Each row's step time and speed-up in every round (nothing for a single round)."""
    for r in rows:
        if "step_s_rounds" not in r:
            continue
        label = f"{r['arch']} {r['precision']} compile={r['compile']} {r['attention']}"
        label += f" ckpt={r['checkpointing']} {r.get('augment', 'random')}"
        line = f"  rounds: {label}: step s " + " / ".join(f"{t:.3f}" for t in r["step_s_rounds"])
        speedups = r["speedup_vs_ref_rounds"]
        if all(v is not None for v in speedups):
            line += "; vs ref " + " / ".join(f"{v:.2f}" for v in speedups)
        print(line)


def _fmt(v: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}{spec}}"


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'arch':<14}{'prec':<6}{'compile':<8}{'attention':<10}{'ckpt':<6}{'augment':<8}{'batch':>6}  "
        f"{'crops':<14}"
        f"{'step s':>8}{'data s':>8}{'img/s':>8}{'GFLOP/s':>9}{'peak':>8}{'MFU':>6}{'MiB':>7}{'step MiB':>9}"
        f"{'mem x':>7}{'vs ref':>7}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['arch']:<14}{r['precision']:<6}{str(r['compile']):<8}{r['attention']:<10}"
            f"{str(r['checkpointing']):<6}{r.get('augment', 'random'):<8}{r['batch']:>6}  {r['crops']:<14}"
            f"{r['step_s']:>8.3f}{r['data_s']:>8.3f}"
            f"{r['images_per_s']:>8.1f}{r['achieved_gflops']:>9.1f}{r['peak_gflops']:>8.0f}{r['mfu']:>6.0%}"
            f"{r['peak_mib']:>7.0f}{r['step_peak_mib']:>9.0f}"
            f"{_fmt(r.get('mem_vs_explicit'), '.2f', 7)}{_fmt(r.get('speedup_vs_ref'), '.2f', 7)}"
        )
