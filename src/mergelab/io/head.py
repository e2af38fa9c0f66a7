"""One file format for the linear task heads that bench, adapt and recycle write and read.

``head.safetensors`` holds ``weight [classes, hidden]`` and, optionally, ``bias [classes]``. Earlier
recycle outputs stored them as ``head.weight`` / ``head.bias`` (the keys of a classifier's state dict);
those are still read.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from mergelab.errors import MergelabError

HEAD_FILE = "head.safetensors"
_LEGACY_PREFIX = "head."


def head_tensors(tensors: Mapping[str, torch.Tensor], where: str = "head") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias or None) from a head's tensors, in either key layout; checks the shapes."""
    keys = set(tensors)
    if "weight" not in keys and _LEGACY_PREFIX + "weight" in keys:
        tensors = {k[len(_LEGACY_PREFIX):]: v for k, v in tensors.items() if k.startswith(_LEGACY_PREFIX)}
    w, b = tensors.get("weight"), tensors.get("bias")
    if w is None or w.dim() != 2:
        raise MergelabError(f"{where}: needs a 2-D tensor 'weight' [classes, hidden]")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise MergelabError(f"{where}: 'bias' has shape {tuple(b.shape)}, expected ({w.shape[0]},)")
    return w, b


def load_head_file(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read a ``head.safetensors`` (new or legacy keys) as (weight, bias or None)."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(os.fspath(path))
    except Exception as exc:  # safetensors raises several types for a broken file
        raise MergelabError(f"{path}: not a readable safetensors file ({exc})") from None
    return head_tensors(tensors, os.fspath(path))


def save_head_file(path: str | os.PathLike, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Write a head as ``weight`` (and ``bias``), the layout every reader of the project expects."""
    from safetensors.torch import save_file

    tensors = {"weight": weight.detach().contiguous().cpu()}
    if bias is not None:
        tensors["bias"] = bias.detach().contiguous().cpu()
    save_file(tensors, os.fspath(path))


class ZeroShotHead(nn.Linear):
    """logits = W . normalize(x) + b with W = scale * unit class embeddings, b = 0.

    The scale is baked into the weights as in Ilharco et al.'s ``ClassificationHead`` (ALGORITHMS-2
    section 14.1), so a plain linear reader of ``head.safetensors`` gets the same argmax.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.normalize(x, dim=-1), self.weight, self.bias)
