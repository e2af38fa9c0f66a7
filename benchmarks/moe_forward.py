"""MoE inference: forward time of ``mergelab moe`` outputs vs their base and a dense fine-tune.

A small Llama (hidden 384, intermediate 1536, 6 layers, 6 heads, 2 KV heads, vocab 4,000; random weights and a
word-level tokenizer built here, nothing downloaded) is the base; ``--experts`` fine-tunes are the base plus
random deltas on every MLP. ``build_moe`` (gate_mode ``hidden``, one prompt per expert) turns them into a
**Mixtral** for each ``--top-k`` and, with the base as shared expert, a **Qwen2-MoE**. mergelab writes these in
transformers' own layout, so their forward is transformers': what is timed is that forward under each of the
experts implementations transformers offers on this device (``eager``: a loop over the experts that are hit;
``batched_mm``: one batched matmul over the (token, slot) pairs; ``grouped_mm``: tokens sorted by expert and
one grouped matmul; measured up to ``BATCHED_MM_TOKENS`` tokens, past which one forward takes minutes here), round robin with the base and the dense fine-tune, median of ``--repeats``, full causal-LM
forward (logits included, ``use_cache=False``, eager attention, ``torch.inference_mode``).

Ratios are to the base measured in the same round, so machine load mostly cancels; each implementation's
logits are compared with ``eager``'s (max abs difference printed).

    PYTHONPATH=src python benchmarks/moe_forward.py [--threads 2] [--experts 4] [--top-k 1 2] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

SHAPES = [(1, 1), (1, 128), (8, 128), (32, 128), (8, 512)]
IMPLEMENTATIONS = ["eager", "batched_mm", "grouped_mm"]
BATCHED_MM_TOKENS = 128     # batched_mm gathers every (token, slot)'s expert weights: 85x the base at 128 tokens
VOCAB = 4000


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(folder)


def build_inputs(root: Path, experts: int, seed: int = 0) -> tuple[Path, list[Path]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(cfg).eval()
    sd = base.state_dict()
    gen = torch.Generator().manual_seed(seed + 1)
    folders = []
    for i in range(experts + 1):
        folder = root / ("base" if i == 0 else f"ft{i}")
        model = base
        if i:
            model = LlamaForCausalLM(cfg).eval()
            model.load_state_dict({k: v + 0.05 * v.std() * torch.randn(v.shape, generator=gen) if ".mlp." in k else v
                                   for k, v in sd.items()})
        model.save_pretrained(folder)
        _tokenizer(folder)
        folders.append(folder)
    return folders[0], folders[1:]


def build_outputs(root: Path, base: Path, fts: list[Path], top_ks: list[int]) -> dict[str, Path]:
    from mergelab.upscale.moe import build_moe

    experts = [{"source_model": str(f), "positive_prompts": [f"w{10 * i + 1} w{10 * i + 2} w{10 * i + 3}"]}
               for i, f in enumerate(fts)]
    out = {}
    for k in top_ks:
        out[f"Mixtral top-{k}"] = root / f"mixtral{k}"
        build_moe({"base_model": str(base), "gate_mode": "hidden", "experts_per_token": k, "experts": experts},
                  out[f"Mixtral top-{k}"])
    k = max(top_ks)
    out[f"Qwen2-MoE top-{k} + shared"] = root / "qwen2moe"
    build_moe({"base_model": str(base), "gate_mode": "hidden", "experts_per_token": k, "experts": experts,
               "shared_experts": [{"source_model": str(base), "positive_prompts": ["w900 w901"]}]},
              root / "qwen2moe")
    return out


def load(folder: Path, experts_implementation: str | None = None):
    from transformers import AutoModelForCausalLM

    kw = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32, **kw).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--shapes", default=",".join(f"{b}x{s}" for b, s in SHAPES), help="BATCHxSEQ,...")
    ap.add_argument("--out", help="also write the Markdown table to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    lines = [f"threads {args.threads}, {args.experts} experts, median of {args.repeats}; "
             "ms per forward (ratio to base)", ""]
    with tempfile.TemporaryDirectory(prefix="moe-forward-") as tmp:
        root = Path(tmp)
        base_dir, fts = build_inputs(root, args.experts)
        outputs = build_outputs(root, base_dir, fts, args.top_k)
        base, dense = load(base_dir), load(fts[0])
        for title, folder in outputs.items():
            variants = {impl: load(folder, impl) for impl in IMPLEMENTATIONS}
            models = {"base": base, "dense fine-tune": dense, **{f"moe {i}": m for i, m in variants.items()}}
            lines += [f"### {title} ({type(variants['eager']).__name__})", "",
                      "| batch x seq | " + " | ".join(models) + " | max abs diff vs eager |",
                      "|---" * (len(models) + 2) + "|"]
            for b, s in shapes:
                ids = torch.randint(4, VOCAB, (b, s), generator=torch.Generator().manual_seed(b * 1000 + s))
                timed = {n: m for n, m in models.items() if n != "moe batched_mm" or b * s <= BATCHED_MM_TOKENS}
                with torch.inference_mode():
                    ref = variants["eager"](ids, use_cache=False).logits
                    diff = max(float((m(ids, use_cache=False).logits - ref).abs().max())
                               for i, m in variants.items() if i != "eager" and f"moe {i}" in timed)
                    rounds = []
                    for _ in range(args.repeats + 1):                       # the first round warms up
                        r = {}
                        for name, m in timed.items():
                            t0 = time.perf_counter()
                            m(ids, use_cache=False)
                            r[name] = time.perf_counter() - t0
                        rounds.append(r)
                    rounds = rounds[1:]
                cells = [f"{1e3 * statistics.median(r[n] for r in rounds):.2f} "
                         f"({statistics.median(r[n] / r['base'] for r in rounds):.2f}x)" if n in timed else "-"
                         for n in models]
                lines.append(f"| {b} x {s} | " + " | ".join(cells) + f" | {diff:.1e} |")
                print(lines[-1], flush=True)
            lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
