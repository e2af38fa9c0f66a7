"""``mergelab moe CONFIG OUT_DIR``: a mixture-of-experts model from a mergekit-moe config."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "moe", help="build a Mixtral / Qwen2-MoE model from dense fine-tunes (mergekit-moe configs)",
        description="Read a mergekit-moe config (base_model, experts with positive/negative prompts, gate_mode "
                    "hidden|hidden_avg|cheap_embed|random|uniform_random, experts_per_token, shared_experts, "
                    "dtype, architecture) and write a model that transformers loads with AutoModelForCausalLM. "
                    "For a data-free mixture of low-rank experts use 'mergelab upscale smile'.")
    p.add_argument("config", help="mergekit-moe YAML config")
    p.add_argument("out_dir", help="output folder (a Hugging Face model folder)")
    p.add_argument("--device", default="cpu", help="where the base runs to compute hidden-state gates (cpu, cuda)")
    p.add_argument("--seed", type=int, default=0, help="seed of random gates and expert noise (default 0)")
    p.add_argument("--shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--allow-all-same", "--i-understand-this-is-not-useful-without-training", action="store_true",
                   dest="allow_all_same", help="build even when every expert is the same model")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from mergelab.cli.common import TqdmProgress
    from mergelab.upscale.moe import build_moe, load_moe_config

    config = load_moe_config(args.config, allow_all_same=args.allow_all_same)
    progress = TqdmProgress(args.quiet)
    try:
        s = build_moe(config, args.out_dir, force=args.force, device=args.device, seed=args.seed,
                      shard_size=args.shard_size, progress=progress)
    finally:
        progress.close()
    if s.degenerate_layers:
        print(f"mergelab: warning: layers {s.degenerate_layers} have nearly dependent router rows (condition "
              "number > 5): the prompts may be too similar, some experts will be underused", file=sys.stderr)
    shared = f" + {s.shared_experts} shared" if s.shared_experts else ""
    print(f"built a {s.architecture} model: {s.experts} experts{shared}, {s.experts_per_token} per token, "
          f"{s.layers} layers, gates '{s.gate_mode}', {s.parameters / 1e6:.1f} M parameters in {s.seconds:.1f} s "
          f"-> {s.out_dir}")
    return 0
