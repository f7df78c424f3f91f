"""The benchmark suite in one command (``make bench`` = ``python -m bench``): every benchmark in its own
process, one after the other (run it on an otherwise idle machine), each printing its table and writing its
JSON under bench/results/, then a summary of the headline numbers in bench/results/summary.json.

``python -m bench --only step memory`` runs a subset; ``--list`` shows the parts and their commands.
Sizes are for a 2-core CPU; on a GPU the step runs at the release's 64 images per step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.args import RESULTS, write_result

_GPU = torch.cuda.is_available()
_VITS16_BATCH = "64" if _GPU else "8"
_VITS8_BATCH = "32" if _GPU else "4"
_DEMO_DATA = Path("data/embedded")


def _step(args: str, json_name: str, steps: int = 2) -> list[str]:
    return ["bench.train_step", "--steps", str(steps), *args.split(), "--json", str(RESULTS / json_name)]


def parts() -> dict[str, list[str]]:
    """Name -> module and arguments. The JSON names are what :func:`summary` reads back."""
    return {
        # The demo recipe through its real loader: the data time against the step time.
        "demo": _step(
            f"--recipe configs/demo.yaml --data {_DEMO_DATA / 'train'} --workers 1 --precision bf16 fp32 "
            "--compile off on --attention explicit fused",
            "step_demo.json",
        ),
        # The paper's ViT-S/16 step (2x224 + 10x96, 65536 prototypes): MFU and the release-equivalent row.
        "step": _step(
            f"--batch {_VITS16_BATCH} --precision bf16 fp32 --attention fused explicit "
            "--checkpointing off on",
            "step_vits16.json",
        ),
        "compile": _step(
            f"--batch {_VITS16_BATCH} --precision bf16 --compile off on "
            f"--attention {'fused' if _GPU else 'explicit'}",
            "step_vits16_compile.json",
        ),
        # Memory levers where attention is a large share of the activations (785 tokens per global crop).
        "memory": _step(
            f"--patch 8 --batch {_VITS8_BATCH} --precision bf16 --attention fused explicit "
            "--checkpointing off on",
            "step_vits8_memory.json",
            steps=1,
        ),
        "data": ["bench.data_pipeline", "--json", str(RESULTS / "data_pipeline.json")],
        "knn": ["bench.knn", "--json", str(RESULTS / "knn.json")],
        "video": ["bench.attention_video", "--frames", "8", "--json", str(RESULTS / "attention_video.json")],
    }


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def summary() -> dict:
    """Headline numbers from whichever part's JSON exists."""
    out: dict = {}
    for name in ("step_demo.json", "step_vits16.json", "step_vits16_compile.json", "step_vits8_memory.json"):
        data = _load(name)
        if data is None:
            continue
        for r in data["rows"]:
            label = (
                f"{r['recipe'] or r['arch']} {r['precision']} {'compiled' if r['compile'] else 'eager'} "
                f"{r['attention']}{' ckpt' if r['checkpointing'] else ''}"
            )
            out[label] = {
                k: r.get(k)
                for k in (
                    "step_s",
                    "data_s",
                    "images_per_s",
                    "mfu",
                    "step_peak_mib",
                    "mem_vs_explicit",
                    "speedup_vs_ref",
                )
            }
    for name in ("data_pipeline.json", "knn.json", "attention_video.json"):
        data = _load(name)
        if data is not None:
            out[name.removesuffix(".json")] = data.get("rows", data)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(parts()), help="run these parts only")
    p.add_argument("--list", action="store_true", help="print the parts and their commands")
    args = p.parse_args(argv)
    chosen = {k: v for k, v in parts().items() if not args.only or k in args.only}
    if args.list:
        for name, cmd in chosen.items():
            print(f"{name:<8} python -m {' '.join(cmd)}")
        return 0
    if "demo" in chosen and not (_DEMO_DATA / "train").is_dir():
        from dino_train.data import generate_embedded_dataset

        generate_embedded_dataset(_DEMO_DATA)
    failed = []
    for name, cmd in chosen.items():
        print(f"\n== {name}: python -m {' '.join(cmd)}", flush=True)
        t = time.time()
        if subprocess.run([sys.executable, "-m", *cmd], check=False).returncode:
            failed.append(name)
        print(f"== {name}: {time.time() - t:.0f} s", flush=True)
    write_result(RESULTS / "summary.json", summary(), announce=False)
    print(f"\nwrote {RESULTS / 'summary.json'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
