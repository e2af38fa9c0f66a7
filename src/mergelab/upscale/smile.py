"""SMILE upscaling: zero-shot sparse mixture of low-rank experts (Tang et al., arXiv 2408.10174).

N fine-tunings of one base become one model whose chosen ``nn.Linear`` layers hold the base
weight plus N rank-k experts (truncated SVD of each task delta) and a data-free router built
from the experts' top right singular vectors.  Semantics follow FusionBench
(``fusion_bench/models/smile_moe/linear_from_module.py``), see ALGORITHMS.md section 5:

* gate of expert i: the top ``gate_k`` right singular vectors of dW_i (rows of V^T, no
  singular-value scaling); router logit r_i = ||G_i x||_2, softmax over all experts, top-K,
  renormalised; with one expert the routing weight is 1;
* expert i: A_i = (S_k V_k)^T, B_i = U_k (``k = -1``: the dense dW_i) plus its bias delta;
* a layer whose deltas are all zero stays a plain ``nn.Linear``;
* every other parameter comes from the base (or the plain average with ``average_experts``).

The layers are built one at a time, so only one layer's SVDs are ever held in memory.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import shutil
from pathlib import Path
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergelab.errors import MergelabError
from mergelab.io.model_card import write_model_card
from mergelab.kernels.svd import factored_svd, robust_svd, robust_svd_lowrank

__all__ = [
    "SmileLinear",
    "upscale_to_smile",
    "save_smile",
    "load_smile",
    "count_parameters",
    "parameter_report",
    "truncated_svd",
    "smile_linear_from_weights",
    "smile_expert_from_lora",
    "load_base_model",
]

SMILE_CONFIG_NAME = "smile_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
# below this atol a delta counts as "not trained" (FusionBench uses torch.allclose(dW, 0))
ZERO_ATOL = 1e-8


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------
class SmileLinear(nn.Module):
    """A Linear layer holding the base weight, E experts and a data-free SVD router.

    ``weight``/``bias`` are the base layer's, so code that inspects ``layer.weight.dtype``
    keeps working.  Experts are stored stacked: low-rank ``expert_A [E, k, in]`` and
    ``expert_B [E, out, k]``, or dense ``expert_weight [E, out, in]`` when ``k = -1``;
    ``expert_bias [E, out]`` holds each expert's bias delta.  ``gate_weight [E*gate_k, in]``
    stacks the experts' gate vectors, expert-major.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int,
        k: int,
        gate_k: int,
        top_k: int = 1,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if num_experts < 1:
            raise MergelabError(f"SmileLinear needs at least one expert, got {num_experts}")
        if gate_k < 1:
            raise MergelabError(f"gate_k must be >= 1, got {gate_k}")
        if k == 0 or k < -1:
            raise MergelabError(f"k must be a positive rank or -1 (dense experts), got {k}")
        if top_k < 1:
            raise MergelabError(f"top_k must be >= 1, got {top_k}")
        fk = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.num_experts = num_experts
        self.k = k
        self.gate_k = gate_k
        self.top_k = min(top_k, num_experts)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **fk))
        self.bias = nn.Parameter(torch.empty(out_features, **fk)) if bias else None
        self.gate_weight = nn.Parameter(torch.empty(num_experts * gate_k, in_features, **fk))
        if k == -1:
            self.expert_weight = nn.Parameter(
                torch.empty(num_experts, out_features, in_features, **fk))
        else:
            self.expert_A = nn.Parameter(torch.empty(num_experts, k, in_features, **fk))
            self.expert_B = nn.Parameter(torch.empty(num_experts, out_features, k, **fk))
        self.expert_bias = nn.Parameter(torch.empty(num_experts, out_features, **fk)) if bias else None

    @property
    def dense_experts(self) -> bool:
        return self.k == -1

    def spec(self) -> dict[str, Any]:
        """The constructor arguments, as saved in ``smile_config.json``."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "num_experts": self.num_experts, "k": self.k, "gate_k": self.gate_k,
                "top_k": self.top_k, "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_experts={self.num_experts}, k={self.k}, gate_k={self.gate_k}, "
                f"top_k={self.top_k}, bias={self.bias is not None}")

    def router_logits(self, x: Tensor) -> Tensor:
        """r_i = ||G_i x||_2 for each expert; x is [..., in], result [..., E]."""
        lead = x.shape[:-1]
        g = F.linear(x.reshape(-1, self.in_features), self.gate_weight)
        return g.view(-1, self.num_experts, self.gate_k).norm(p=2, dim=2).view(*lead, self.num_experts)

    def routing(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(weights [..., K], expert indices [..., K]) for x [..., in]: softmax over all experts,
        top-K, renormalised."""
        lead = x.shape[:-1]
        if self.num_experts == 1:
            return (torch.ones(*lead, 1, dtype=x.dtype, device=x.device),
                    torch.zeros(*lead, 1, dtype=torch.long, device=x.device))
        p = F.softmax(self.router_logits(x), dim=-1)
        w, idx = torch.topk(p, self.top_k, dim=-1)
        return w / w.sum(dim=-1, keepdim=True), idx

    def expert_delta(self, e: int, x: Tensor) -> Tensor:
        """Output of expert e alone (without the base): dW_e x + db_e, low-rank or dense."""
        b = None if self.expert_bias is None else self.expert_bias[e]
        if self.dense_experts:
            return F.linear(x, self.expert_weight[e], b)
        return F.linear(F.linear(x, self.expert_A[e]), self.expert_B[e], b)

    # every low-rank expert on every token with the unrouted ones weighted 0 (a few large GEMMs, no
    # gather) while the wasted (token, expert) pairs are few; beyond, tokens grouped by expert, which
    # computes only the routed pairs (measured: benchmarks/smile_forward.py)
    MASKED_MAX_WASTED_PAIRS = 512

    def expert_mode(self, tokens: int = 1) -> str:
        """How ``forward`` computes the experts for ``tokens`` rows: "masked" or "grouped"."""
        if self.num_experts == 1:
            return "masked"
        if self.dense_experts or tokens * (self.num_experts - self.top_k) > self.MASKED_MAX_WASTED_PAIRS:
            return "grouped"
        return "masked"

    def forward(self, x: Tensor, mode: str | None = None) -> Tensor:
        """base(x) + sum over the top-K experts of weight * expert(x), for x [..., in].

        ``mode`` ("masked" or "grouped", default ``expert_mode()``) only changes the float summation
        order: both compute every token at once, without a per-token or per-slot loop in Python, and
        add the experts straight into the base's output (no separate delta buffer)."""
        lead = x.shape[:-1]
        h = x.reshape(-1, self.in_features)
        out = F.linear(h, self.weight, self.bias)
        w, idx = self.routing(h)
        w = w.to(out.dtype)
        mode = mode or self.expert_mode(h.shape[0])
        if mode == "masked":
            out = self._masked(out, h, w, idx)
        elif mode == "grouped":
            out = self._grouped(out, h, w, idx)
        else:
            raise MergelabError(f"unknown SMILE expert mode {mode!r} (use masked or grouped)")
        return out.view(*lead, self.out_features)

    def _dense_routing(self, w: Tensor, idx: Tensor) -> Tensor:
        """[T, E] routing weights: the top-K weights at their experts, 0 elsewhere."""
        if self.num_experts == 1:
            return w
        return torch.zeros(w.shape[0], self.num_experts, dtype=w.dtype, device=w.device).scatter_(1, idx, w)

    def _masked(self, out: Tensor, h: Tensor, w: Tensor, idx: Tensor) -> Tensor:
        """Every expert on every token, the unrouted ones weighted 0: a few large GEMMs, no gather."""
        dense = self._dense_routing(w, idx)                                   # [T, E]
        if self.dense_experts:
            for e in range(self.num_experts):   # E GEMMs over all tokens (chosen for E == 1)
                out.add_(F.linear(h, self.expert_weight[e]).mul_(dense[:, e:e + 1]))
        else:
            z = F.linear(h, self.expert_A.reshape(-1, self.in_features))      # [T, E*k], one GEMM
            z = z.view(h.shape[0], self.num_experts, self.k).mul_(dense.unsqueeze(-1).to(z.dtype))
            for e in range(self.num_experts):   # accumulate z_e @ B_e^T in place: no copy of the B's
                out.addmm_(z[:, e], self.expert_B[e].t())
        if self.expert_bias is not None:
            out.addmm_(dense.to(out.dtype), self.expert_bias)
        return out

    def _grouped(self, out: Tensor, h: Tensor, w: Tensor, idx: Tensor) -> Tensor:
        """Token-slot pairs sorted by expert (one argsort, one gather), then per expert one GEMM (pair) on
        its contiguous rows and a weighted scatter-add: only the routed (token, expert) pairs are computed."""
        top = idx.shape[1]
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens = order.div(top, rounding_mode="floor")
        rows = h.index_select(0, tokens)
        weights = w.reshape(-1).index_select(0, order).unsqueeze(-1)
        start = 0
        for e, c in enumerate(counts):
            if c:
                end = start + c
                part = self.expert_delta(e, rows[start:end]).mul_(weights[start:end])
                out.index_add_(0, tokens[start:end], part.to(out.dtype))
            start += c
        return out


# --------------------------------------------------------------------------------------------
# construction of one layer
# --------------------------------------------------------------------------------------------
def truncated_svd(m: Tensor, rank: int, method: str = "auto", niter: int = 6,
                  oversample: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` SVD of a 2-D float tensor: (U [m, r], S [r], V [n, r]) with m ~= U diag(S) V^T.

    ``method``: "full" (``torch.linalg.svd``), "lowrank" (``torch.svd_lowrank``, randomized,
    ``q = rank + oversample`` columns, default oversample max(10, rank), and ``niter`` power
    iterations) or "auto" (lowrank when 8 * rank <= min(m, n), where it is 2-8x faster on
    MiniLM-sized layers; full otherwise).  Randomized SVD is only as exact as the spectrum
    decays: its rank-r approximation error is within ~1e-3 of the optimum, but the subspace
    itself is ill-defined when singular values near r are nearly equal.  Computed in float32
    on the tensor's device; a factorisation LAPACK fails to converge on is retried
    (``mergelab.kernels.svd.robust_svd``).
    """
    a = m.detach().to(torch.float32)
    r = min(rank, *a.shape)
    if method not in ("auto", "full", "lowrank"):
        raise MergelabError(f"unknown SVD method {method!r} (use auto, full or lowrank)")
    if method == "auto":
        method = "lowrank" if 8 * r <= min(a.shape) else "full"
    if method == "lowrank":
        q = min(r + (oversample if oversample is not None else max(10, r)), *a.shape)
        if q < min(a.shape):
            u, s, v = robust_svd_lowrank(a, q=q, niter=niter)
            return u[:, :r], s[:r], v[:, :r]
    u, s, vh = robust_svd(a)
    return u[:, :r], s[:r], vh[:r].T


def _all_zero(ts: Sequence[Tensor | None]) -> bool:
    return all(t is None or bool((t.abs() <= ZERO_ATOL).all()) for t in ts)


@torch.no_grad()
def smile_linear_from_weights(
    base_weight: Tensor,
    base_bias: Tensor | None,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None] | None = None,
    k: int = 32,
    gate_k: int = 16,
    top_k: int = 1,
    routing_use_diff: bool = True,
    svd: str = "auto",
    factors: Sequence[tuple[Tensor, Tensor, float] | None] | None = None,
) -> SmileLinear | None:
    """Build one SmileLinear from the base Linear's weight/bias and the fine-tuned ones.

    Returns None when every weight delta is zero (FusionBench's ExpertNotTrainedError: the
    layer stays the base Linear).  ``k`` and ``gate_k`` are clipped to min(out, in).
    ``factors[i] = (A, B, scaling)`` gives expert i's delta as a LoRA product: its router and
    expert then come from the exact SVD of the factors (``smile_expert_from_lora``), no dense SVD.
    """
    d_out, d_in = base_weight.shape
    n = len(weights)
    if biases is None:
        biases = [None] * n
    dws = [w.detach().to(torch.float32) - base_weight.detach().to(torch.float32) for w in weights]
    if _all_zero(dws):
        return None
    full = min(d_out, d_in)
    k_eff = -1 if k == -1 else min(k, full)
    gk_eff = min(gate_k, full)
    layer = SmileLinear(d_in, d_out, n, k_eff, gk_eff, top_k, bias=base_bias is not None,
                        device=base_weight.device, dtype=base_weight.dtype)
    layer.weight.copy_(base_weight)
    if base_bias is not None:
        layer.bias.copy_(base_bias)
    dt = base_weight.dtype
    for i, dw in enumerate(dws):
        low_rank = factors[i] if factors is not None else None
        if low_rank is not None and routing_use_diff and k_eff > 0:
            gate, expert_a, expert_b = smile_expert_from_lora(*low_rank, k=k_eff, gate_k=gk_eff)
            layer.gate_weight[i * gk_eff:(i + 1) * gk_eff].copy_(gate.to(dt))
            layer.expert_A[i].copy_(expert_a.to(dt))
            layer.expert_B[i].copy_(expert_b.to(dt))
            if base_bias is not None:
                b = biases[i]
                layer.expert_bias[i].copy_((b - base_bias) if b is not None else torch.zeros_like(base_bias))
            continue
        if routing_use_diff or k_eff > 0:  # one SVD of dW serves both gate and expert
            u, s, v = truncated_svd(dw, max(gk_eff, k_eff) if routing_use_diff else k_eff, svd)
        if routing_use_diff:
            gate_v = v[:, :gk_eff]
        else:  # gate from the full fine-tuned weight W_i
            gate_v = truncated_svd(weights[i], gk_eff, svd)[2]
        layer.gate_weight[i * gk_eff:(i + 1) * gk_eff].copy_(gate_v.T.to(dt))
        if k_eff == -1:
            layer.expert_weight[i].copy_(dw.to(dt))
        else:
            layer.expert_A[i].copy_((s[:k_eff] * v[:, :k_eff]).T.to(dt))
            layer.expert_B[i].copy_(u[:, :k_eff].to(dt))
        if base_bias is not None:
            b = biases[i]
            layer.expert_bias[i].copy_((b - base_bias) if b is not None else torch.zeros_like(base_bias))
    return layer


# --------------------------------------------------------------------------------------------
# whole-model construction
# --------------------------------------------------------------------------------------------
class _Source:
    """Name-resolving read access to one fine-tuned model (module, state dict or lazy checkpoint).

    Fine-tuned checkpoints often carry a wrapper prefix the base lacks ("bert.") or the other
    way round; the prefix is found once from the keys and applied to every lookup.
    """

    def __init__(self, obj: Any, index: int, base_names: Sequence[str]):
        self.index = index
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if not (isinstance(obj, Mapping) or (hasattr(obj, "get") and hasattr(obj, "keys"))):
            raise MergelabError(
                f"fine-tuned model {index}: expected an nn.Module, a state dict or a checkpoint, "
                f"got {type(obj).__name__}")
        self.obj = obj
        self.keys = set(obj.keys())
        self.add, self.strip = "", ""
        probe = [n for n in base_names if n in self.keys]
        if not probe and base_names:
            self._find_prefix(base_names)

    def _find_prefix(self, base_names: Sequence[str]) -> None:
        for name in base_names:
            for key in self.keys:
                if key.endswith("." + name):
                    self.add = key[: len(key) - len(name)]
                    return
                if name.endswith("." + key):
                    self.strip = name[: len(name) - len(key)]
                    return

    def key(self, name: str) -> str | None:
        if name in self.keys:
            return name
        if self.add and self.add + name in self.keys:
            return self.add + name
        if self.strip and name.startswith(self.strip) and name[len(self.strip):] in self.keys:
            return name[len(self.strip):]
        return None

    def has(self, name: str) -> bool:
        return self.key(name) is not None

    def factors(self, name: str) -> tuple[Tensor, Tensor, float] | None:
        """(A, B, scaling) when this model is a LoRA adapter that adapts ``name``, else None."""
        adapter = getattr(self.obj, "adapter", None)
        key = self.key(name)
        if adapter is None or key is None or key not in getattr(adapter, "modules", {}):
            return None
        return adapter.factors(key)

    def get(self, name: str, like: Tensor) -> Tensor:
        key = self.key(name)
        if key is None:
            raise MergelabError(f"fine-tuned model {self.index} has no tensor for '{name}'")
        t = self.obj[key] if isinstance(self.obj, Mapping) else self.obj.get(key)
        if tuple(t.shape) != tuple(like.shape):
            raise MergelabError(
                f"fine-tuned model {self.index}: tensor '{key}' has shape {tuple(t.shape)}, "
                f"the base has {tuple(like.shape)}")
        return t.to(like.device)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """A pattern matches a module name as a glob on the full name or on its last components
    ("query" matches "encoder.layer.0.attention.self.query", like peft's target_modules)."""
    for p in patterns:
        if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p):
            return True
    return False


def _tied_linears(model: nn.Module) -> dict[str, str]:
    """{Linear name: name of the other module sharing its weight} (e.g. a tied ``lm_head``)."""
    owners: dict[int, str] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and n and not isinstance(m, nn.Linear):
            owners.setdefault(id(w), n)
    return {n: owners[id(m.weight)] for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n and id(m.weight) in owners}


def select_linear_layers(model: nn.Module, target_modules: Sequence[str] | str | None) -> list[str]:
    """Names of the nn.Linear modules to upscale (all of them when no pattern is given).

    A Linear whose weight is tied to another module (a causal LM's ``lm_head`` tied to the input
    embedding) is left alone: it follows that module; naming it in a pattern is an error."""
    tied = _tied_linears(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    if target_modules is None:
        return [n for n in linears if n not in tied]
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    chosen = [n for n in linears if _matches(n, target_modules)]
    for p in target_modules:
        if not any(_matches(n, [p]) for n in linears):
            raise MergelabError(f"target_modules pattern '{p}' matches no nn.Linear layer of the base model")
    for n in chosen:
        if n in tied:
            raise MergelabError(f"layer '{n}' shares its weight with '{tied[n]}' (tied embeddings); SMILE cannot "
                                "upscale a tied weight: leave it out of target_modules")
    return chosen


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def upscale_to_smile(
    base_model: nn.Module,
    finetuned: Sequence[nn.Module | Mapping[str, Tensor] | Any],
    k: int = 32,
    gate_k: int = 16,
    top_k: int = 1,
    target_modules: Sequence[str] | str | None = None,
    average_experts: bool = False,
    routing_use_diff: bool = True,
    full_svd: bool | str = "auto",
    inplace: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> nn.Module:
    """Upscale ``base_model`` with the fine-tuned models into a SMILE mixture (no data, no training).

    ``finetuned``: modules of the same architecture, state dicts, or lazy checkpoints (anything
    with ``keys()`` and ``get(name)``, e.g. ``mergelab.io.open_checkpoint``); a wrapper prefix
    such as "bert." is resolved automatically.  ``k = -1`` gives dense (full-rank) experts.
    ``target_modules``: glob patterns on module names (default: every nn.Linear).
    ``full_svd``: True = exact SVD, False = randomized ``torch.svd_lowrank``, "auto" = lowrank
    when 8 * max(k, gate_k) <= min(out, in).  Works on a deep copy unless ``inplace``.
    ``progress(stage, done, total)`` is called after each layer (the CLI draws a tqdm bar).
    """
    if not finetuned:
        raise MergelabError("SMILE needs at least one fine-tuned model")
    if k == 0 or k < -1:
        raise MergelabError(f"k must be a positive rank or -1 (dense experts), got {k}")
    if gate_k < 1 or top_k < 1:
        raise MergelabError(f"gate_k and top_k must be >= 1, got gate_k={gate_k}, top_k={top_k}")
    svd = ("full" if full_svd else "lowrank") if isinstance(full_svd, bool) else full_svd
    if svd not in ("auto", "full", "lowrank"):
        raise MergelabError(f"full_svd must be True, False or 'auto', got {full_svd!r}")
    model = base_model if inplace else copy.deepcopy(base_model)
    names = select_linear_layers(model, target_modules)
    base_state_names = list(model.state_dict().keys())
    sources = [_Source(f, i, base_state_names) for i, f in enumerate(finetuned)]
    layers: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    for done, name in enumerate(names, 1):
        lin = model.get_submodule(name)
        ws = [s.get(name + ".weight", lin.weight) for s in sources]
        bs = [s.get(name + ".bias", lin.bias) if lin.bias is not None else None for s in sources]
        low_rank = [s.factors(name + ".weight") for s in sources]
        new = smile_linear_from_weights(lin.weight, lin.bias, ws, bs, k=k, gate_k=gate_k,
                                        top_k=top_k, routing_use_diff=routing_use_diff, svd=svd,
                                        factors=low_rank if any(f is not None for f in low_rank) else None)
        del ws, bs
        if new is None:
            skipped.append(name)
        else:
            new.train(lin.training)
            _set_submodule(model, name, new)
            layers[name] = new.spec()
        if progress is not None:
            progress("SMILE layers", done, len(names))
    if average_experts:
        upscaled = tuple(n + "." for n in layers)
        for pname, t in model.state_dict().items():
            if pname.startswith(upscaled) or not t.is_floating_point():
                continue
            if not all(s.has(pname) for s in sources):
                continue
            acc = torch.zeros_like(t, dtype=torch.float32)
            for s in sources:
                acc += s.get(pname, t).to(torch.float32)
            t.copy_((acc / len(sources)).to(t.dtype))
    model.smile_info = {"k": k, "gate_k": gate_k, "top_k": top_k,
                        "routing_use_diff": routing_use_diff, "average_experts": average_experts,
                        "num_experts": len(sources), "svd": svd, "layers": layers,
                        "skipped_zero_delta": skipped}
    return model


# --------------------------------------------------------------------------------------------
# parameter accounting
# --------------------------------------------------------------------------------------------
def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter elements (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def parameter_report(smile_model: nn.Module, base_params: int, num_models: int) -> dict[str, float]:
    """SMILE size vs the base and vs keeping ``num_models`` separate fine-tuned models."""
    n = count_parameters(smile_model)
    return {"smile_params": n, "base_params": base_params,
            "separate_params": base_params * num_models,
            "ratio_vs_base": n / base_params,
            "ratio_vs_separate": n / (base_params * num_models)}


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------
def _smile_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {n: m.spec() for n, m in model.named_modules() if isinstance(m, SmileLinear)}


def save_smile(model: nn.Module, out_dir: str | os.PathLike, overwrite: bool = False,
               tokenizer_folder: str | os.PathLike | None = None, inputs: Sequence[str] = (),
               base_model: str | None = None, models: Sequence[str] = ()) -> str:
    """Write ``config.json`` (transformers config, when the model has one), ``model.safetensors``
    and ``smile_config.json`` into ``out_dir`` atomically (temp folder beside it, then rename).

    Tokenizer files found in ``tokenizer_folder`` (e.g. the base model's folder) are copied
    alongside, so that the output folder is self-contained.  Returns the folder path.
    """
    from safetensors.torch import save_model

    from mergelab.io import TOKENIZER_FILES, atomic_output_dir

    with atomic_output_dir(out_dir, force=overwrite, inputs=[*inputs, tokenizer_folder], command="smile") as tmp:
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "save_pretrained"):
            cfg.save_pretrained(tmp)
        for p in model.parameters():  # safetensors refuses non-contiguous tensors
            if not p.is_contiguous():
                p.data = p.data.contiguous()
        save_model(model, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        info = dict(getattr(model, "smile_info", {}) or {})
        info.pop("layers", None)
        meta = {"format_version": FORMAT_VERSION, "method": "smile",
                "model_class": type(model).__name__,
                "parameters": count_parameters(model),
                "options": info, "layers": _smile_layers(model)}
        with open(os.path.join(tmp, SMILE_CONFIG_NAME), "w") as f:
            json.dump(meta, f, indent=2)
        write_model_card(Path(tmp), method="SMILE", base_model=base_model, models=list(models), kind="upscaling",
                         tags=["smile", "moe"], recipe={"options": info, "parameters": meta["parameters"]},
                         extra="Load it with `mergelab.upscale.smile.load_smile(OUT_DIR)`.")
        if tokenizer_folder is not None:
            for name in TOKENIZER_FILES:
                src = os.path.join(os.fspath(tokenizer_folder), name)
                if os.path.isfile(src):
                    shutil.copy2(src, os.path.join(tmp, name))
        umask = os.umask(0)
        os.umask(umask)  # mkdtemp and safetensors create owner-only modes: apply the usual umask
        os.chmod(tmp, 0o777 & ~umask)
        os.chmod(os.path.join(tmp, WEIGHTS_NAME), 0o666 & ~umask)
    return os.path.abspath(os.path.expanduser(os.fspath(out_dir)))


def _architecture_class(folder: str, model_class: str | None = None):
    """The transformers class to build for ``folder``: ``model_class`` (as saved by ``save_smile``), else the
    first of ``config.architectures`` (``LlamaForCausalLM`` keeps its ``lm_head``), else ``AutoModel``.
    A class transformers does not provide (custom code) is refused: no remote code is run."""
    import transformers
    from transformers import AutoConfig, AutoModel

    if not os.path.exists(os.path.join(folder, "config.json")):
        raise MergelabError(f"'{folder}' has no config.json: pass the architecture as load_smile(path, model=...)")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        raise MergelabError(f"{folder}/config.json: transformers cannot read it "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None

    def known(name):
        cls = getattr(transformers, name, None) if name else None
        return cls if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) else None

    if known(model_class):
        return config, known(model_class)
    names = list(getattr(config, "architectures", None) or [])
    if not names:
        return config, AutoModel
    cls = known(names[0])
    if cls is None:
        raise MergelabError(f"{folder}/config.json: architecture {names[0]!r} is not a transformers model class "
                            "(custom code is not run); load the model yourself and call upscale_to_smile")
    return config, cls


def load_base_model(folder: str | os.PathLike, device: str | torch.device = "cpu",
                    attn_implementation: str | None = "eager") -> nn.Module:
    """Load a Hugging Face folder as the architecture its config names (heads included), in eval mode.

    ``AutoModel`` would drop the heads of e.g. ``LlamaForCausalLM`` (``lm_head``) or
    ``...ForSequenceClassification``; a SMILE model built from it could not produce logits.
    """
    folder = os.fspath(folder)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise MergelabError(f"{folder}: SMILE's base model must be a Hugging Face folder with a config.json")
    _, cls = _architecture_class(folder)
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = cls.from_pretrained(folder, **kw)
    except (OSError, ValueError) as e:
        raise MergelabError(f"{folder}: cannot load the base model with transformers "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return model.to(device).eval()


def _build_architecture(out_dir: str, model_class: str | None, attn_implementation: str) -> nn.Module:
    config, cls = _architecture_class(out_dir, model_class)
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if hasattr(cls, "_from_config"):
        return cls._from_config(config, **kw)
    return cls.from_config(config, **kw)


def read_folder_config(out_dir: str, name: str, method: str, version: int, what: str) -> dict:
    """The JSON config of an upscaled folder (SMILE, WEMoE), checked for its method and format version."""
    path = os.path.join(out_dir, name)
    if not os.path.isfile(path):
        raise MergelabError(f"'{out_dir}' is not a {what} folder: no {name}")
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise MergelabError(f"{path}: invalid JSON ({e})") from e
    if meta.get("method") != method or meta.get("format_version") != version:
        raise MergelabError(f"{path}: not a {what.split()[0]} config of format version {version}")
    return meta


def load_smile(out_dir: str | os.PathLike, model: nn.Module | None = None,
               attn_implementation: str | None = "eager", device: str | torch.device = "cpu") -> nn.Module:
    """Load a folder written by ``save_smile``: rebuild the architecture (transformers config, or
    the given ``model`` skeleton), swap the listed Linear layers for SmileLinear, load weights.
    Returns the model in eval mode."""
    from safetensors.torch import load_model

    out_dir = os.fspath(out_dir)
    cfg_path = os.path.join(out_dir, SMILE_CONFIG_NAME)
    meta = read_folder_config(out_dir, SMILE_CONFIG_NAME, "smile", FORMAT_VERSION, "SMILE model")
    if model is None:
        model = _build_architecture(out_dir, meta.get("model_class"), attn_implementation)
    for name, spec in meta["layers"].items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise MergelabError(f"{cfg_path}: layer '{name}' does not exist in the architecture") from None
        if not isinstance(lin, (nn.Linear, SmileLinear)) or (lin.in_features, lin.out_features) != (
                spec["in_features"], spec["out_features"]):
            raise MergelabError(f"{cfg_path}: layer '{name}' is not a matching Linear in the architecture")
        new = SmileLinear(**spec, device=lin.weight.device, dtype=lin.weight.dtype)
        _set_submodule(model, name, new)
    wpath = os.path.join(out_dir, WEIGHTS_NAME)
    if not os.path.exists(wpath):
        raise MergelabError(f"'{out_dir}' has no {WEIGHTS_NAME}")
    try:
        load_model(model, wpath, strict=True, device=str(device))
    except RuntimeError as e:
        raise MergelabError(f"{wpath}: weights do not fit the architecture ({str(e).splitlines()[0]})") from e
    model.smile_info = dict(meta.get("options", {}), layers=meta["layers"])
    return model.to(device).eval()


def smile_expert_from_lora(a: torch.Tensor, b: torch.Tensor, scaling: float, k: int, gate_k: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SMILE's expert and router for ``dW = scaling * B @ A``, from the factors (no dense SVD).

    Returns ``(gate [gate_k, d_in], expert_A [k, d_in], expert_B [d_out, k])`` as SMILE builds them from
    ``svd(dW) = U S V^T`` (ALGORITHMS.md 5.1): gate = V[:, :gate_k]^T, expert_A = (S[:k] V[:, :k])^T,
    expert_B = U[:, :k]. Beyond the adapter's rank the singular values are zero: those rows/columns are
    zero here (a dense SVD would fill them with arbitrary null-space vectors).
    """
    u, s, vh = factored_svd(b, a, scaling)
    j = s.numel()
    d_out, d_in = b.shape[0], a.shape[1]
    gate = a.new_zeros(gate_k, d_in)
    gate[: min(j, gate_k)] = vh[:gate_k]
    expert_a = a.new_zeros(k, d_in)
    expert_a[: min(j, k)] = (s[:, None] * vh)[:k]
    expert_b = b.new_zeros(d_out, k)
    expert_b[:, : min(j, k)] = u[:, :k]
    return gate, expert_a, expert_b
