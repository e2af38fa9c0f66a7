"""Tiny Llama-layout checkpoints and a mergekit 0.1.5 runner for the recipe tests.

mergekit is a test-time reference only, in its own virtualenv: ``MERGEKIT_VENV`` (default
/work/wt/mergekit-venv, else REPO/.cache/mergekit-venv). Tests that need it skip when it is absent, unless
``MERGELAB_MERGEKIT_INSTALL=1`` is set: then it is created on demand the way benchmarks/vs_mergekit.py
does (torch 2.13.0 CPU first, then mergekit==0.1.5 from PyPI).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def mergekit_venv() -> Path:
    env = os.environ.get("MERGEKIT_VENV")
    if env:
        return Path(env)
    for p in (Path("/work/wt/mergekit-venv"), REPO / ".cache" / "mergekit-venv"):
        if (p / "bin" / "mergekit-yaml").exists():
            return p
    return REPO / ".cache" / "mergekit-venv"


def mergekit_exe() -> Path:
    venv = mergekit_venv()
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    if os.environ.get("MERGELAB_MERGEKIT_INSTALL") == "1":
        import importlib.util
        spec = importlib.util.spec_from_file_location("vs_mergekit_install", REPO / "benchmarks" / "vs_mergekit.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["vs_mergekit_install"] = mod
        spec.loader.exec_module(mod)
        return mod.ensure_mergekit(venv.resolve(), lambda m: print(m, file=sys.stderr))
    pytest.skip(f"mergekit 0.1.5 venv not found at {venv} (set MERGELAB_MERGEKIT_INSTALL=1 to create it)")


_BATCH = r"""
import json, sys, traceback, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
failed = {}
extra = json.loads(sys.argv[2])
for recipe, out in json.loads(sys.argv[1]):
    try:
        text = open(recipe).read()
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), out,
                  options=MergeOptions(copy_tokenizer=False, allow_crimes=True, quiet=True, **extra),
                  config_source=text)
    except Exception:
        failed[recipe] = traceback.format_exc()[-2000:]
print(json.dumps(failed))
"""


def run_mergekit_batch(jobs: list[tuple[Path, Path]], **options) -> dict[str, str]:
    """Run mergekit 0.1.5 on every (recipe, out) in one process (one torch import); returns failures.
    ``options``: more ``MergeOptions`` (e.g. ``random_seed``)."""
    import json
    exe = mergekit_exe()
    r = subprocess.run([str(exe.parent / "python"), "-c", _BATCH, json.dumps([[str(a), str(b)] for a, b in jobs]),
                        json.dumps(options)],
                       capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if r.returncode != 0:
        raise AssertionError(f"mergekit runner failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_mergekit(recipe: Path, out: Path, **options) -> None:
    failed = run_mergekit_batch([(recipe, out)], **options)
    if failed:
        raise AssertionError(f"mergekit failed on {recipe}:\n{failed[str(recipe)]}")


def make_llama(path: Path, seed: int, layers: int = 4, dtype: torch.dtype = torch.float32, base: Path | None = None,
               scale: float = 0.01, arch: str = "llama", intermediate: int = 64) -> Path:
    """A tiny causal LM checkpoint (random weights; with ``base``: base + Gaussian noise of ``scale``)."""
    import transformers
    cfgs = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, {"head_dim": 8}),
    }
    tie = arch == "gemma2"     # Gemma ties its head to the embeddings (mergekit's architecture has no lm_head)
    cfg_cls, model_cls, extra = cfgs[arch]
    cfg = cfg_cls(hidden_size=32, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=tie,
                  **extra)
    torch.manual_seed(seed)
    model = model_cls(cfg)
    sd = model.state_dict()
    if base is not None:
        from mergelab import load_state_dict
        bsd = load_state_dict(base)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for k, v in sd.items():
                if k in bsd:    # a tied head is the embedding
                    v.copy_(bsd[k] + scale * torch.randn(v.shape, generator=g))
    else:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for k, v in sd.items():
                v.copy_(torch.randn(v.shape, generator=g) * 0.05 + (1.0 if k.endswith("norm.weight") else 0.0))
    model.to(dtype).save_pretrained(path)
    return path
