"""Tiny real checkpoints for tests: transformers models saved as Hugging Face folders."""

from pathlib import Path

import torch
from transformers import BertConfig, BertModel

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]


def tiny_bert_config() -> BertConfig:
    return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      vocab_size=len(VOCAB), max_position_embeddings=32, attn_implementation="eager")


def make_model_folders(root: Path, n: int = 3, seed: int = 0, scale: float = 0.02,
                       dtype: torch.dtype = torch.float32, shard: str | None = None) -> tuple[Path, list[Path]]:
    """A base BertModel and n fine-tunes (base + random deltas), each a HF folder with a vocab."""
    torch.manual_seed(seed)
    base = BertModel(tiny_bert_config()).eval()
    folders = []
    for i in range(n + 1):
        model = base if i == 0 else BertModel(tiny_bert_config())
        if i:
            g = torch.Generator().manual_seed(seed * 100 + i)
            sd = {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                  for k, v in base.state_dict().items()}
            model.load_state_dict(sd)
        model = model.to(dtype)
        folder = root / ("base" if i == 0 else f"ft{i}")
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(folder, **kwargs)
        (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
        folders.append(folder)
    return folders[0], folders[1:]


def write_recipe(path: Path, base: Path, models: list[Path], method: str, params: dict | None = None,
                 model_params: list[dict] | None = None, **extra) -> Path:
    """A recipe file; ``compat: paper`` unless given (a recipe without it means mergekit's semantics)."""
    import yaml
    extra.setdefault("compat", "paper")
    recipe = {"base_model": str(base),
              "models": [{"model": str(m), **({"parameters": p} if p else {})}
                         for m, p in zip(models, model_params or [None] * len(models))],
              "merge_method": method, **({"parameters": params} if params else {}), **extra}
    path.write_text(yaml.safe_dump(recipe))
    return path
