"""Cost of DARE's random drop mask: the float mask of mergelab <= 2026-11 vs the integer-bit mask.

One block of the streaming engine (``--elements``, default 4 M float32 = 16 MB) is masked and
rescaled by 1/(1-p), alternating the two implementations in one process, ``--repeats`` times; the
median time of each and their ratio (old / new, same rounds) are printed, with the kept fractions.

* ``old``: ``torch.rand`` floats, ``sub_``/``sign_``/``add_``/``clamp_`` into a float mask, multiply,
  divide (three delta-sized buffers);
* ``new``: ``kernels.dare`` (numpy PCG64 raw bits, integer threshold, AND on the float bits, one buffer),
  out of place and ``inplace=True`` (what the merge does on its own task vectors);
* ``torch.rand only``: the old generator alone, for reference.

    PYTHONPATH=src python benchmarks/dare_mask.py [--threads 1] [--elements 4194304] [--density 0.5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mergelab import kernels as K


def old_dare(delta: torch.Tensor, drop_rate: float, generator: torch.Generator) -> torch.Tensor:
    mask = torch.rand(delta.shape, generator=generator, device=delta.device).sub_(drop_rate).sign_()
    kept = delta * mask.add_(1).clamp_(max=1)
    return kept / (1.0 - drop_rate)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--elements", type=int, default=1 << 22)
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    p = 1.0 - args.density
    x = torch.randn(args.elements, generator=torch.Generator().manual_seed(0))
    scratch = x.clone()
    fns = {
        "old (float mask)": lambda i: old_dare(x, p, torch.Generator().manual_seed(i)),
        "new": lambda i: K.dare(x, p, torch.Generator().manual_seed(i)),
        "new in place": lambda i: K.dare(scratch.copy_(x), p, torch.Generator().manual_seed(i), inplace=True),
        "copy only (in-place baseline)": lambda i: scratch.copy_(x),
        "torch.rand only": lambda i: torch.rand(x.shape, generator=torch.Generator().manual_seed(i)),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    kept = {}
    for r in range(args.repeats + 1):
        for name, f in fns.items():
            t0 = time.perf_counter()
            out = f(r)
            dt = time.perf_counter() - t0
            if r:
                times[name].append(dt)
            if name.startswith(("old", "new")):
                kept[name] = float((out != 0).float().mean())
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = statistics.median(o / n for o, n in zip(times["old (float mask)"], times["new"]))
    ratio_inplace = statistics.median(o / (n - c) for o, n, c in zip(
        times["old (float mask)"], times["new in place"], times["copy only (in-place baseline)"]))
    print(f"{args.elements} float32 elements, density {args.density}, {args.threads} thread(s), "
          f"median of {args.repeats}")
    print("| variant | ms | kept fraction |\n|---|---|---|")
    for k in fns:
        print(f"| {k} | {1e3 * med[k]:.1f} | {kept.get(k, float('nan')):.4f} |")
    print(f"\nmask cost old/new (out of place): {ratio:.2f}x; old/new in place (copy subtracted): {ratio_inplace:.2f}x")


if __name__ == "__main__":
    main()
