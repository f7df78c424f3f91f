"""Benchmark of the k-NN search: faiss ``IndexFlatIP`` against the release's ``test @ train.T`` + ``topk``.

``python -m bench.knn`` (100k x 384 bank, 10k queries, k=200, 1000 classes) times both on random
L2-normalised features, checks they find the same neighbours and the same weighted-vote predictions,
prints a table and writes bench/results/knn.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import torch.nn.functional as F

from bench.args import RESULTS, add_device, add_json, add_threads, pick_bench_device, write_result
from bench.memory import peak_mib, reset_peak, rss_mib
from dino_train.measure.knn import faiss_has_gpu, faiss_topk, knn_vote


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=100_000)
    p.add_argument("--n-query", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=200, help="neighbours (the release's largest k)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--chunk", type=int, default=1000, help="queries per brute-force matrix product")
    add_threads(p)
    add_device(p)
    p.add_argument("--seed", type=int, default=0)
    add_json(p, RESULTS / "knn.json")
    return p.parse_args(argv)


def brute_topk(
    train: torch.Tensor, queries: torch.Tensor, k: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's search: (chunk, N) cosine similarities per block of queries, then topk. (M, k) each."""
    sims, idx = [], []
    for start in range(0, queries.shape[0], chunk):
        s, i = (queries[start : start + chunk] @ train.T).topk(k, dim=1)
        sims.append(s)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def _timed(fn, device: torch.device) -> tuple[object, float, float]:
    """Result, seconds and extra peak memory in MiB: the CUDA allocator peak on a GPU, else the process's
    resident-set high-water mark above its size when the work started."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    reset_peak(device)
    start_rss = 0.0 if device.type == "cuda" else rss_mib()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start, peak_mib(device) - start_rss


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_bench_device(args)
    g = torch.Generator().manual_seed(args.seed)
    train = F.normalize(torch.randn(args.n_train, args.dim, generator=g), dim=1)
    queries = F.normalize(torch.randn(args.n_query, args.dim, generator=g), dim=1)
    labels = torch.randint(0, args.num_classes, (args.n_train,), generator=g)
    baseline = rss_mib()

    def predict(sims: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return knn_vote(sims.cpu(), labels[idx.cpu()], args.num_classes).argmax(1)

    # faiss copies the bank into its index; on a CUDA machine with faiss-gpu it searches on the GPU.
    faiss_dev = device if faiss_has_gpu() else torch.device("cpu")
    (f_sims, f_idx), f_s, f_mem = _timed(lambda: faiss_topk(train, queries, args.k), faiss_dev)
    t_dev, q_dev = train.to(device), queries.to(device)
    (b_sims, b_idx), b_s, b_mem = _timed(lambda: brute_topk(t_dev, q_dev, args.k, args.chunk), device)

    f_pred, b_pred = predict(f_sims, f_idx), predict(b_sims, b_idx)
    same_sets = (f_idx.sort(1).values == b_idx.cpu().sort(1).values).all(1)
    rows = [
        ("faiss IndexFlatIP" + (" (GPU)" if faiss_dev.type == "cuda" else ""), f_s, f_mem, faiss_dev.type),
        (f"matmul + topk (chunks of {args.chunk})", b_s, b_mem, device.type),
    ]
    print(f"k-NN search: bank {args.n_train} x {args.dim}, {args.n_query} queries, k={args.k}, threads "
          f"{torch.get_num_threads()}, process RSS before {baseline:.0f} MiB")  # fmt: skip
    print(f"{'method':<34} {'device':>6} {'seconds':>9} {'queries/s':>10} {'extra peak MiB':>15}")
    for name, s, mem, dev in rows:
        print(f"{name:<34} {dev:>6} {s:>9.2f} {args.n_query / s:>10.0f} {mem:>15.0f}")
    result = {
        "n_train": args.n_train,
        "n_query": args.n_query,
        "dim": args.dim,
        "k": args.k,
        "num_classes": args.num_classes,
        "chunk": args.chunk,
        "faiss_seconds": f_s,
        "brute_seconds": b_s,
        "speed_ratio_brute_over_faiss": b_s / f_s,
        "faiss_peak_mib": f_mem,
        "brute_peak_mib": b_mem,
        "peak_memory_kind": "cuda max_memory_allocated"
        if device.type == "cuda"
        else "process RSS high-water",
        "rss_before_mib": baseline,
        "faiss_device": faiss_dev.type,
        "brute_device": device.type,
        "same_neighbour_sets_fraction": same_sets.float().mean().item(),
        "same_predictions": bool(torch.equal(f_pred, b_pred)),
        "same_predictions_fraction": (f_pred == b_pred).float().mean().item(),
        "max_abs_sim_diff": (f_sims - b_sims.cpu()).abs().max().item(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    same = f"{result['same_predictions']} ({100 * result['same_predictions_fraction']:.3f}%)"
    sets = f"{100 * result['same_neighbour_sets_fraction']:.3f}%"
    ratio = result["speed_ratio_brute_over_faiss"]
    print(
        f"speed ratio (matmul / faiss): {ratio:.2f}x; same predictions: {same}; same neighbour sets: {sets}"
    )
    write_result(args.json, result)
    return 0 if result["same_predictions"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
