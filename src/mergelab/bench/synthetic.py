"""The embedded demo: build small real checkpoints, merge them with every method, print a table.

Three "fine-tunings" of a small BERT are made by adding task vectors with a known structure to a
random base (a low-rank part plus sparse large entries, as real fine-tuning deltas tend to have).
Every registered method then merges the three folders through the same streaming path as
``mergelab merge``; the table shows time and how much of each task vector the merge keeps
(cosine to each task vector and relative norm), which is what the methods trade off.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from mergelab.engine import merge
from mergelab.io import load_state_dict
from mergelab.methods import list_methods

DEMO_PARAMS = {
    "task_arithmetic": {"lambda": 0.4},
    "ties": {"density": 0.2, "lambda": 1.0},
    "breadcrumbs": {"keep": 0.1, "top_remove": 0.01, "lambda": 1.0},
    "breadcrumbs_ties": {"keep": 0.1, "top_remove": 0.01, "lambda": 1.0},
    "dare_linear": {"density": 0.5, "lambda": 0.4, "seed": 0},
    "dare_ties": {"density": 0.5, "lambda": 1.0, "seed": 0},
    "della": {"density": 0.5, "epsilon": 0.1},
    "della_linear": {"density": 0.5, "epsilon": 0.1},
}


def build_checkpoints(root: Path, n_tasks: int = 3, seed: int = 0) -> tuple[Path, list[Path]]:
    """A small BertModel base and fine-tunes = base + (low-rank + sparse) task vectors, as HF folders."""
    from transformers import BertConfig, BertModel
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    config = BertConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                        vocab_size=1000, max_position_embeddings=128)
    torch.manual_seed(seed)
    base = BertModel(config)
    base_sd = base.state_dict()
    base.save_pretrained(root / "base")
    folders = []
    g = torch.Generator().manual_seed(seed + 1)
    for t in range(n_tasks):
        sd = {}
        for name, w in base_sd.items():
            if not w.is_floating_point():
                sd[name] = w
                continue
            delta = 0.002 * torch.randn(w.shape, generator=g)
            if w.dim() == 2:
                r = 4
                delta += 0.01 * torch.randn(w.shape[0], r, generator=g) @ torch.randn(r, w.shape[1], generator=g) / r
            spikes = torch.rand(w.shape, generator=g) < 0.01
            delta += spikes * 0.05 * torch.randn(w.shape, generator=g)
            sd[name] = w + delta
        model = BertModel(config)
        model.load_state_dict(sd)
        folder = root / f"task{t + 1}"
        model.save_pretrained(folder)
        folders.append(folder)
    return root / "base", folders


def _flat(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.float().reshape(-1) for k, v in sorted(sd.items()) if v.is_floating_point()])


def run_demo(out: str | Path | None = None, quiet: bool = False) -> int:
    with tempfile.TemporaryDirectory(prefix="mergelab-demo-") as tmp:
        root = Path(out) if out else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        if not quiet:
            print(f"building a base and 3 fine-tuned checkpoints (small BERT) in {root} ...")
        base, tasks = build_checkpoints(root)
        base_vec = _flat(load_state_dict(base))
        task_vecs = [_flat(load_state_dict(t)) - base_vec for t in tasks]
        mean_norm = sum(v.norm() for v in task_vecs) / len(task_vecs)
        rows = []
        for method in list_methods():
            n = method.max_models or len(tasks)      # slerp, nearswap, ... take one model besides the base
            recipe = {"base_model": str(base), "models": [{"model": str(t)} for t in tasks[:n]],
                      "merge_method": method.name, "parameters": DEMO_PARAMS.get(method.name, {}),
                      "compat": "paper"}
            started = time.perf_counter()
            summary = merge(recipe, root / "merged" / method.name, force=True)
            seconds = time.perf_counter() - started
            merged = _flat(load_state_dict(summary.out_dir)) - base_vec
            cosines = [float(torch.nn.functional.cosine_similarity(merged, v, dim=0)) for v in task_vecs]
            rows.append((method.name, seconds, summary.parameters, cosines, float(merged.norm() / mean_norm),
                         float((merged == 0).float().mean())))
        print()
        print("| method | seconds | parameters | cos to task 1 | task 2 | task 3 | norm / mean task norm | zero entries |")
        print("|---|---|---|---|---|---|---|---|")
        for name, seconds, params, cos, norm, zeros in rows:
            print(f"| {name} | {seconds:.2f} | {params / 1e6:.2f} M | {cos[0]:.3f} | {cos[1]:.3f} | {cos[2]:.3f} "
                  f"| {norm:.3f} | {zeros:.1%} |")
        print("\nEach row merged 3 checkpoint folders into a Hugging Face folder (streaming, safetensors).")
        if out:
            print(f"outputs kept in {root / 'merged'}")
    return 0
