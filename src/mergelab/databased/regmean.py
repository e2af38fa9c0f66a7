"""RegMean (Jin et al., ICLR 2023) and RegMean++ (Nguyen et al., arXiv 2508.03121); ALGORITHMS-2.md 15.1-15.2.

Per ``nn.Linear`` with weight W [out, in], task t's Gram matrix of the layer's inputs
``G_t = X_t^T X_t / n_t`` (every token row; rows of padding tokens are left out when the batch has an
``attention_mask``), its off-diagonal entries scaled by ``alpha`` (FusionBench default 0.95; 1 = exact
RegMean, 0 = diagonal), and the closed form

    W* = ( (sum_t G_t)^-1  sum_t G_t W_t^T )^T

Every other parameter (biases, norms, embeddings) is the plain mean over the fine-tuned models.
Inputs come from each task's OWN fine-tuned model on that task's data (forward hooks, float64).

RegMean++ propagates the inputs through the already-merged prefix: tensors are grouped into stages
(those before the first residual block, one stage per block, those after the last), and the Gram
matrices of stage s come from a model whose earlier stages are already merged and whose stage s
(and later) are task t's. Blocks are found from tensor names as LiNeS does (``methods.lines``); the
forward stops after block s, so stage s costs one pass through s + 1 blocks per task.

Memory: one task's Gram matrices of the current stage plus the running sums sum_t G_t and
sum_t G_t W_t^T (float64), whatever the number of tasks.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from mergelab.databased.common import limited, linear_names, run_batch, to_device, token_mask
from mergelab.errors import MergelabError
from mergelab.methods.lines import DEFAULT_BLOCK_PATTERN, block_index


def reduce_non_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """Off-diagonal entries times alpha, diagonal unchanged (FusionBench ``reduce_non_diagonal_elements``)."""
    if alpha == 1.0:
        return gram
    scale = torch.full_like(gram, alpha)
    scale.diagonal().fill_(1.0)
    return gram * scale


def regmean_merge_linear(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float = 1.0,
                         name: str = "linear") -> torch.Tensor:
    """W* = ((sum G_t)^-1 sum G_t W_t^T)^T from per-task weights [out, in] and Grams [in, in] (float64 out)."""
    s_g, s_gw = None, None
    for w, g in zip(weights, grams):
        g = reduce_non_diagonal(g.double(), alpha)
        gw = g @ w.double().T
        s_g = g if s_g is None else s_g + g
        s_gw = gw if s_gw is None else s_gw + gw
    return _solve(s_g, s_gw, name)


def _solve(s_g: torch.Tensor, s_gw: torch.Tensor, name: str) -> torch.Tensor:
    try:
        out = torch.linalg.solve(s_g, s_gw).T
    except RuntimeError:
        out = None
    if out is None or not bool(torch.isfinite(out).all()):
        raise MergelabError(f"RegMean: the summed Gram matrix of '{name}' is singular (too few examples or dead "
                            "inputs); use more examples or alpha < 1")
    return out


class _Stop(Exception):
    """Raised by a hook after the stage's last block: the rest of the forward is not needed."""


def _raise_stop(module, inputs, output):
    raise _Stop()


class _GramHooks:
    def __init__(self, model: torch.nn.Module, names: Sequence[str]):
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {n: 0 for n in names}
        self.mask: torch.Tensor | None = None
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            if self.mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(self.mask.shape):
                x = x[self.mask.to(x.device).bool()]
            x = x.reshape(-1, x.shape[-1]).double()
            g = x.T @ x
            self.sums[name] = g if name not in self.sums else self.sums[name].add_(g)
            self.rows[name] += x.shape[0]
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _owner(name: str, modules: Mapping[str, int]) -> str:
    """The nearest module of a parameter name that ran in the probe forward ("" = the root)."""
    parts = name.split(".")[:-1]
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts)


def _stages(model: torch.nn.Module, keys: Sequence[str], probe: Callable[[], None], pattern: str
            ) -> tuple[list[str], dict[str, str]]:
    """Stage of every key for RegMean++: "pre", "block N" (by name) or "post" (by execution order)."""
    order: dict[str, int] = {}

    def seen(name: str):
        def hook(module, inputs):
            order.setdefault(name, len(order))      # returns None: the inputs are left alone
        return hook
    handles = [m.register_forward_pre_hook(seen(n)) for n, m in model.named_modules() if n]
    try:
        probe()
    finally:
        for h in handles:
            h.remove()
    blocks = sorted({i for k in keys if (i := block_index(k, pattern)) is not None})
    first_block = min((o for n, o in order.items() if block_index(n + ".", pattern) is not None), default=None)
    stage = {}
    for k in keys:
        i = block_index(k, pattern)
        if i is not None:
            stage[k] = f"block {i}"
        else:
            o = order.get(_owner(k, order))
            stage[k] = "pre" if first_block is not None and o is not None and o < first_block else "post"
    return ["pre", *[f"block {i}" for i in blocks], "post"], stage


def _block_module(key: str, pattern: str) -> str:
    m = re.search(pattern, key)
    return key[:m.end(1)].lstrip(".")


@torch.no_grad()
def regmean(model: torch.nn.Module, finetuned: Sequence[Mapping[str, torch.Tensor]], loaders: Sequence[Iterable], *,
            alpha: float = 0.95, num_examples: int = 256, plus_plus: bool = False, exclude: str | None = None,
            block_pattern: str = DEFAULT_BLOCK_PATTERN, device: str | torch.device | None = None,
            forward: Callable | None = None, progress: Callable[[str, int, int], None] | None = None
            ) -> dict[str, torch.Tensor]:
    """RegMean (``plus_plus=False``) or RegMean++ merge of ``finetuned`` state dicts of ``model``'s
    architecture; ``loaders[t]`` yields batches of task t (its first ``num_examples`` examples are used).

    ``exclude``: regex of Linear module names merged by the mean instead. ``forward(module, batch)``
    runs one batch (default: dict -> keywords, tuple -> positional, Tensor -> the input).
    Returns the merged state dict (model's key order, the fine-tuned models' dtypes)."""
    T = len(finetuned)
    if T == 0:
        raise MergelabError("RegMean needs at least one fine-tuned model")
    if len(loaders) != T:
        raise MergelabError(f"{T} fine-tuned models but {len(loaders)} data loaders")
    if not 0.0 <= alpha <= 1.0:
        raise MergelabError(f"RegMean: alpha must be in [0, 1], got {alpha}")
    forward = forward or run_batch
    work = copy.deepcopy(model).to(device or "cpu").eval()
    keys = list(work.state_dict().keys())
    for i, sd in enumerate(finetuned, 1):
        missing = [k for k in keys if k not in sd]
        if missing:
            raise MergelabError(f"fine-tuned model {i} lacks tensor '{missing[0]}'")
    linears = [n for n in linear_names(work, exclude) if f"{n}.weight" in keys]
    weight_of = {f"{n}.weight": n for n in linears}

    def load(t: int, merged: Mapping[str, torch.Tensor]) -> None:
        work.load_state_dict({k: merged.get(k, finetuned[t][k]) for k in keys}, strict=True)

    def run(t: int, hooks: _GramHooks | None) -> None:
        for batch in limited(loaders[t], num_examples, f"data loader {t + 1}"):
            batch = to_device(batch, device)
            if hooks is not None:
                hooks.mask = token_mask(batch)
            try:
                forward(work, batch)
            except _Stop:
                pass

    if plus_plus:
        load(0, {})

        def probe():
            batch = next(iter(limited(loaders[0], 1)))
            forward(work, to_device(batch, device))
        order, stage_of = _stages(work, keys, probe, block_pattern)
    else:
        order, stage_of = ["all"], {k: "all" for k in keys}
    merged: dict[str, torch.Tensor] = {}
    for done, stage in enumerate(order, 1):
        stage_keys = [k for k in keys if stage_of[k] == stage]
        stage_linears = [weight_of[k] for k in stage_keys if k in weight_of]
        if not stage_keys:
            continue
        s_g: dict[str, torch.Tensor] = {}
        s_gw: dict[str, torch.Tensor] = {}
        rows: dict[str, list[int]] = {n: [] for n in stage_linears}
        for t in range(T):
            if not stage_linears:
                break
            load(t, merged)
            hooks = _GramHooks(work, stage_linears)
            stop = None
            if stage.startswith("block"):
                blk = work.get_submodule(_block_module(stage_linears[0] + ".weight", block_pattern))
                stop = blk.register_forward_hook(_raise_stop)
            try:
                run(t, hooks)
            finally:
                hooks.remove()
                if stop is not None:
                    stop.remove()
            for n in stage_linears:
                rows[n].append(hooks.rows[n])
                if hooks.rows[n] == 0:
                    continue
                g = reduce_non_diagonal(hooks.sums.pop(n) / hooks.rows[n], alpha)
                gw = g @ finetuned[t][f"{n}.weight"].to(g.device).double().T
                s_g[n] = g if n not in s_g else s_g[n].add_(g)
                s_gw[n] = gw if n not in s_gw else s_gw[n].add_(gw)
        for k in stage_keys:
            ref = finetuned[0][k]
            n = weight_of.get(k)
            if n is not None and all(r > 0 for r in rows[n]):
                merged[k] = _solve(s_g[n], s_gw[n], n).to(device="cpu", dtype=ref.dtype)
            elif ref.is_floating_point():
                merged[k] = (sum(sd[k].double() for sd in finetuned) / T).to(ref.dtype)
            else:
                merged[k] = ref.clone()
        if progress is not None:
            progress("RegMean++ stages" if plus_plus else "RegMean", done, len(order))
    return {k: merged[k] for k in keys}
