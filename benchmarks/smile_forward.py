"""SMILE inference: forward time of an upscaled model vs its base and a dense fine-tune.

A MiniLM-sized BERT encoder (hidden 384, intermediate 1536, 6 layers, 12 heads; random weights built
here, nothing downloaded) is the base; ``--experts`` fine-tunes are the base plus random deltas with a
decaying spectrum on every Linear. ``upscale_to_smile`` (k, gate_k, top-k as given) turns every Linear
of the encoder into a SmileLinear. For each batch size x sequence length the forward pass
(``torch.inference_mode``, eager attention) of these models is timed, round robin, median of
``--repeats``:

* ``base``: the base encoder; ``dense fine-tune``: one fine-tune (same architecture, same cost);
* ``smile``: the SMILE model with the default forward (``SmileLinear.expert_mode()``);
* ``smile masked`` / ``smile grouped``: the two vectorised strategies forced;
* ``smile loop (old)``: the forward of mergelab <= 2026-11 (per expert: ``torch.where``, gather,
  ``index_add_``), for the before/after ratio.

Ratios are to the base measured in the same round, so machine load mostly cancels. Outputs of every
SMILE variant are checked against the old loop (max abs difference printed).

    PYTHONPATH=src python benchmarks/smile_forward.py [--threads 2] [--experts 4] [--top-k 1 2] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
import types

import torch
import torch.nn.functional as F

from mergelab.upscale.smile import SmileLinear, upscale_to_smile

SHAPES = [(1, 1), (1, 128), (8, 128), (32, 128), (8, 512)]


def old_forward(self: SmileLinear, x: torch.Tensor) -> torch.Tensor:
    """mergelab's SmileLinear.forward before the vectorised one (the reference)."""
    out = F.linear(x, self.weight, self.bias)
    h = x.reshape(-1, self.in_features)
    w, idx = self.routing(h)
    delta = torch.zeros(h.shape[0], self.out_features, dtype=out.dtype, device=out.device)
    for e in range(self.num_experts):
        tok, slot = torch.where(idx == e)
        if tok.numel() == 0:
            continue
        d = self.expert_delta(e, h[tok]) * w[tok, slot].unsqueeze(-1)
        delta.index_add_(0, tok, d.to(delta.dtype))
    return out + delta.view(out.shape)


def build(experts: int, seed: int = 0):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=30522, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                     num_attention_heads=12, max_position_embeddings=512, attn_implementation="eager")
    torch.manual_seed(seed)
    base = BertModel(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    fts = []
    for _ in range(experts):
        sd = {}
        for name, t in base.state_dict().items():
            t = t.clone()
            if t.dim() == 2 and name.startswith("encoder."):
                m, n = t.shape
                r = min(m, n)
                u = torch.randn(m, r, generator=gen) / m ** 0.5
                v = torch.randn(n, r, generator=gen) / n ** 0.5
                s = torch.arange(1, r + 1, dtype=torch.float32) ** -1.0
                t += 0.05 * t.norm() * (u * s) @ v.T / ((u * s) @ v.T).norm()
            sd[name] = t
        fts.append(sd)
    dense = BertModel(cfg).eval()
    dense.load_state_dict(fts[0])
    return base, dense, fts


class _Variant(torch.nn.Module):
    """The SMILE model with every SmileLinear's forward replaced (or forced to one mode)."""

    def __init__(self, model: torch.nn.Module, how: str):
        super().__init__()
        self.model, self.how = model, how

    def forward(self, ids):
        layers = [m for m in self.model.modules() if isinstance(m, SmileLinear)]
        saved = [m.forward for m in layers]
        for m in layers:
            if self.how == "loop":
                m.forward = types.MethodType(old_forward, m)
            elif self.how in ("masked", "grouped"):
                m.forward = types.MethodType(lambda s, x, _h=self.how: SmileLinear.forward(s, x, mode=_h), m)
        try:
            return self.model(ids).last_hidden_state
        finally:
            for m, f in zip(layers, saved):
                m.forward = f


def time_round(models: dict, ids: torch.Tensor) -> dict[str, float]:
    out = {}
    for name, m in models.items():
        t0 = time.perf_counter()
        m(ids)
        out[name] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--gate-k", type=int, default=16)
    ap.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--shapes", default=",".join(f"{b}x{s}" for b, s in SHAPES), help="BATCHxSEQ,...")
    ap.add_argument("--out", help="also write the Markdown table to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    base, dense, fts = build(args.experts)
    lines = [f"threads {args.threads}, {args.experts} experts, k {args.k}, gate_k {args.gate_k}, "
             f"median of {args.repeats}; ms per forward (ratio to base)", ""]
    for top_k in args.top_k:
        smile = upscale_to_smile(base, fts, k=args.k, gate_k=args.gate_k, top_k=top_k).eval()
        modes = sorted({m.expert_mode(1) for m in smile.modules() if isinstance(m, SmileLinear)})
        models = {"base": lambda ids: base(ids).last_hidden_state,
                  "dense fine-tune": lambda ids: dense(ids).last_hidden_state,
                  "smile": lambda ids: smile(ids).last_hidden_state,
                  "smile masked": _Variant(smile, "masked"), "smile grouped": _Variant(smile, "grouped"),
                  "smile loop (old)": _Variant(smile, "loop")}
        lines += [f"### top-k {top_k} (default mode for one token: {', '.join(modes)})", "",
                  "| batch x seq | " + " | ".join(models) + " | smile vs old | max abs diff |",
                  "|---" * (len(models) + 3) + "|"]
        for b, s in shapes:
            ids = torch.randint(0, 30522, (b, s), generator=torch.Generator().manual_seed(b * 1000 + s))
            with torch.inference_mode():
                ref = models["smile loop (old)"](ids)
                diff = max(float((models[n](ids) - ref).abs().max()) for n in ("smile", "smile masked", "smile grouped"))
                rounds = [time_round(models, ids) for _ in range(args.repeats + 1)][1:]   # first: warm-up
            med = {n: statistics.median(r[n] for r in rounds) for n in models}
            ratio_old = statistics.median(r["smile loop (old)"] / r["smile"] for r in rounds)
            cells = [f"{1e3 * med[n]:.2f} ({statistics.median(r[n] / r['base'] for r in rounds):.2f}x)"
                     for n in models]
            lines.append(f"| {b} x {s} | " + " | ".join(cells) + f" | {ratio_old:.2f}x faster | {diff:.1e} |")
            print(lines[-1], flush=True)
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
