"""SVD backends on real fine-tunes: time of a whole-model merge and distance to the full-SVD result.

    PYTHONPATH=src python benchmarks/svd_backends.py BASE_DIR FT_DIR [FT_DIR ...] [--threads 1]

For tsv / iso_c / iso_cts with svd=full, auto and randomized: seconds for the whole merge (in memory,
one thread) and ||theta_backend - theta_full|| / ||theta_full - theta_0|| over all merged tensors.
"""

from __future__ import annotations

import argparse
import time

import torch

from mergelab.engine import merge_state_dicts
from mergelab.io import load_state_dict


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("models", nargs="+")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load_state_dict(args.base)
    models = [load_state_dict(m) for m in args.models]
    keys = [k for k in base if base[k].is_floating_point()]
    print(f"{len(models)} models, {sum(base[k].numel() for k in keys) / 1e6:.1f} M parameters")
    print("| method | svd | seconds | ||theta - theta_full|| / ||theta_full - theta_0|| |")
    print("|---|---|---|---|")
    for method in ("tsv", "iso_c", "iso_cts"):
        ref = None
        for mode in ("full", "auto", "randomized"):
            t0 = time.perf_counter()
            out = merge_state_dicts(base, models, method, params={"svd": mode})
            sec = time.perf_counter() - t0
            if ref is None:
                ref = out
                scale = sum(float((ref[k] - base[k]).double().norm() ** 2) for k in keys) ** 0.5
            diff = sum(float((out[k] - ref[k]).double().norm() ** 2) for k in keys) ** 0.5
            print(f"| {method} | {mode} | {sec:.1f} | {diff / scale:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
