"""LiNeS (Wang et al., ICLR 2025, arXiv 2410.17146): scale a merged task vector up with layer depth.

A post-processing option of any task-vector method, not a method of its own: the recipe's ``lines:``
group (or ``merge_state_dicts(..., lines={...})``) makes the engine write, for every merged tensor k,

    theta[k] = theta0[k] + lambda(l(k)) * (merged[k] - theta0[k]),   lambda(l) = alpha + beta * l / (L - 1)

where ``l(k)`` is the residual block the tensor belongs to (0..L-1) and tensors outside every block
(embeddings, final norms, poolers) get ``alpha`` (authors' ``LiNeS_scaling``, ALGORITHMS-2.md 15.6).
``alpha: auto`` is the paper's multi-task choice ``(||sum_t tau_t||_1 / ||tau_merged||_1) / T``: the
shallowest layers get the magnitude of plain averaging. ``merged - theta0`` is the method's output task
vector including its own lambda/alpha: give the method a scale of 1 so that ``beta`` means the paper's.

Block index: the authors take the first ``.l.`` substring, which works for OpenCLIP names only (any
other dotted integer, e.g. a ``Sequential`` index, would be mistaken for a block). Here a block is a
dotted integer right after a block container name (``layer``, ``layers``, ``h``, ``blocks``,
``resblocks``, ...); ``block_pattern`` (a regular expression with one group) overrides it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from mergelab.errors import MergelabError

DEFAULT_BLOCK_PATTERN = r"(?:^|\.)(?:layer|layers|h|block|blocks|resblocks)\.(\d+)(?:\.|$)"
KEYS = ("alpha", "beta", "num_blocks", "block_pattern")


@dataclass(frozen=True)
class LinesConfig:
    """Resolved ``lines:`` group: alpha (a number, or None for the multi-task "auto"), beta,
    num_blocks (0: one more than the deepest block index found) and the block regex."""
    alpha: float | None
    beta: float
    num_blocks: int = 0
    block_pattern: str = DEFAULT_BLOCK_PATTERN

    def as_dict(self) -> dict[str, Any]:
        return {"alpha": "auto" if self.alpha is None else self.alpha, "beta": self.beta,
                "num_blocks": self.num_blocks, "block_pattern": self.block_pattern}


def _number(value: Any, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise MergelabError(f"{where}: lines.{name} must be a finite number, got {value!r}")
    return float(value)


def resolve_lines(raw: Mapping[str, Any] | None, where: str = "recipe") -> LinesConfig | None:
    """Check a ``lines:`` mapping (before any tensor is read); None when LiNeS is off."""
    if raw is None:
        return None
    if isinstance(raw, LinesConfig):
        return raw
    if not isinstance(raw, Mapping):
        raise MergelabError(f"{where}: 'lines' must be a mapping with keys {', '.join(KEYS)}")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise MergelabError(f"{where}: unknown key 'lines.{unknown[0]}' (keys: {', '.join(KEYS)})")
    if "beta" not in raw:
        raise MergelabError(f"{where}: lines.beta is required (the paper picks it on validation from 0.1..1.0)")
    beta = _number(raw["beta"], "beta", where)
    alpha_raw = raw.get("alpha", "auto")
    alpha = None if alpha_raw == "auto" else _number(alpha_raw, "alpha", where)
    n = raw.get("num_blocks", 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise MergelabError(f"{where}: lines.num_blocks must be a non-negative integer, got {n!r}")
    pattern = str(raw.get("block_pattern", DEFAULT_BLOCK_PATTERN))
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise MergelabError(f"{where}: lines.block_pattern is not a regular expression ({e})") from None
    if compiled.groups != 1:
        raise MergelabError(f"{where}: lines.block_pattern needs exactly one group (the block index)")
    return LinesConfig(alpha, beta, n, pattern)


def block_index(name: str, pattern: str = DEFAULT_BLOCK_PATTERN) -> int | None:
    """The residual block a tensor name belongs to (first match), or None outside every block."""
    m = re.search(pattern, name)
    return int(m.group(1)) if m else None


def block_indices(names: Iterable[str], pattern: str = DEFAULT_BLOCK_PATTERN) -> dict[str, int | None]:
    return {n: block_index(n, pattern) for n in names}


def lines_lambdas(alpha: float, beta: float, num_blocks: int) -> list[float]:
    """lambda(l) = alpha + beta * l / (L - 1) for l = 0..L-1 (one block: alpha)."""
    if num_blocks <= 1:
        return [alpha] * max(num_blocks, 1)
    return [alpha + beta * l / (num_blocks - 1) for l in range(num_blocks)]


def multitask_alpha(sum_tv_l1: float, merged_tv_l1: float, num_tasks: int) -> float:
    """alpha = (||sum_t tau_t||_1 / ||tau_merged||_1) / T (authors' multi-task LiNeS)."""
    if merged_tv_l1 <= 0:
        raise MergelabError("LiNeS alpha 'auto': the merged task vector is zero; give lines.alpha")
    return sum_tv_l1 / merged_tv_l1 / num_tasks


def layer_scales(config: LinesConfig, names: Iterable[str], alpha: float | None = None) -> dict[str, float]:
    """Scale of every name's task vector; ``alpha`` fills in an "auto" config."""
    a = config.alpha if config.alpha is not None else alpha
    if a is None:
        raise MergelabError("LiNeS alpha 'auto' needs the task vectors' norms first")
    idx = block_indices(names, config.block_pattern)
    deepest = max((i for i in idx.values() if i is not None), default=-1)
    num = config.num_blocks or deepest + 1
    if deepest >= num:
        raise MergelabError(f"LiNeS: a tensor lies in block {deepest} but lines.num_blocks is {num}")
    lam = lines_lambdas(a, config.beta, num)
    return {n: (a if i is None else lam[i]) for n, i in idx.items()}


def apply_lines(base: Mapping[str, Any], merged: Mapping[str, Any], config: LinesConfig | Mapping[str, Any],
                task_vectors: list[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """LiNeS on in-memory state dicts: base + lambda(l) * (merged - base) for floating tensors.

    ``task_vectors`` (the inputs' tau_t) are needed only for ``alpha: auto``."""
    config = resolve_lines(config, "lines")
    floats = [k for k, v in base.items() if v.is_floating_point()]
    alpha = config.alpha
    if alpha is None:
        if not task_vectors:
            raise MergelabError("LiNeS alpha 'auto' needs the task vectors")
        s = sum(float(sum(tv[k].double() for tv in task_vectors).abs().sum()) for k in floats)
        m = sum(float((merged[k].double() - base[k].double()).abs().sum()) for k in floats)
        alpha = multitask_alpha(s, m, len(task_vectors))
    scales = layer_scales(config, floats, alpha)
    out = dict(merged)
    for k in floats:
        b = base[k]
        out[k] = (b.float() + scales[k] * (merged[k].float() - b.float())).to(merged[k].dtype)
    return out
