"""GPU check of the SVD merges: same result on cuda as on cpu, and per-matrix timings at LLM sizes.

    PYTHONPATH=src python benchmarks/svd_gpu_check.py [--size 4096] [--tasks 3]

Prints, per method, the largest difference between the cpu and cuda merges of a small state dict, then
the time of one size x size matrix merge on the GPU with svd=full and svd=randomized and the relative
difference between the two (the randomized top-k is approximate on full-rank matrices).
"""

from __future__ import annotations

import argparse
import time

import torch

from mergelab.kernels import svd as SK
from mergelab.engine import merge_state_dicts


def small_state_dicts(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {"a.weight": torch.randn(96, 64, generator=g), "a.bias": torch.randn(96, generator=g),
            "b.weight": torch.randn(64, 160, generator=g)}
    models = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(4)]
    return base, models


def fine_tune_like(size: int, tasks: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    """Deltas with a decaying spectrum plus a noise floor, like real fine-tuning task vectors."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(tasks):
        r = size // 4
        low = torch.randn(size, r, generator=g) @ (torch.randn(r, size, generator=g) * (0.97 ** torch.arange(r))[:, None])
        out.append((low / size + 1e-3 * torch.randn(size, size, generator=g)).to(device))
    return out


def timed(fn) -> tuple[torch.Tensor, float]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tasks", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    print(torch.cuda.get_device_name(0), torch.__version__)
    base, models = small_state_dicts()
    for method in ("tsv", "iso_c", "iso_cts"):
        cpu = merge_state_dicts(base, models, method, device="cpu")
        gpu = merge_state_dicts(base, models, method, device="cuda")
        diff = max(float((cpu[k] - gpu[k]).abs().max()) for k in cpu)
        print(f"{method}: max |cpu - cuda| = {diff:.2e}")
    deltas = fine_tune_like(args.size, args.tasks, "cuda")
    SK.tsv_merge(fine_tune_like(256, 2, "cuda"))   # warm-up (cusolver handles)
    kernels = {"tsv": lambda d, m: SK.tsv_merge(d, m), "iso_c": lambda d, m: SK.iso_c(d, m),
               "iso_cts": lambda d, m: SK.iso_cts(d, 0.8, m)}
    print(f"\none {args.size}x{args.size} matrix, {args.tasks} tasks, float32 on the GPU")
    print("| method | svd=full s | svd=randomized s | auto s | ||rand - full|| / ||full|| |")
    print("|---|---|---|---|---|")
    for name, fn in kernels.items():
        full, t_full = timed(lambda: fn(deltas, "full"))
        rand, t_rand = timed(lambda: fn(deltas, "randomized"))
        _, t_auto = timed(lambda: fn(deltas, "auto"))
        rel = float(torch.linalg.matrix_norm(rand - full) / torch.linalg.matrix_norm(full))
        print(f"| {name} | {t_full:.2f} | {t_rand:.2f} | {t_auto:.2f} | {rel:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
