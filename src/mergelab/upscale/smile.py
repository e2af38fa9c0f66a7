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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergelab.errors import MergelabError
from mergelab.kernels.svd import factored_svd

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
        """r_i = ||G_i x||_2 for each expert; x is [T, in], result [T, E]."""
        g = F.linear(x, self.gate_weight).view(x.shape[0], self.num_experts, self.gate_k)
        return g.norm(p=2, dim=2)

    def routing(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(weights [T, K], expert indices [T, K]): softmax over all experts, top-K, renormalised."""
        n = x.shape[0]
        if self.num_experts == 1:
            return (torch.ones(n, 1, dtype=x.dtype, device=x.device),
                    torch.zeros(n, 1, dtype=torch.long, device=x.device))
        p = F.softmax(self.router_logits(x), dim=1)
        w, idx = torch.topk(p, self.top_k, dim=-1)
        return w / w.sum(dim=-1, keepdim=True), idx

    def expert_delta(self, e: int, x: Tensor) -> Tensor:
        """Output of expert e alone (without the base): dW_e x + db_e, low-rank or dense."""
        b = None if self.expert_bias is None else self.expert_bias[e]
        if self.dense_experts:
            return F.linear(x, self.expert_weight[e], b)
        return F.linear(F.linear(x, self.expert_A[e]), self.expert_B[e], b)

    def forward(self, x: Tensor) -> Tensor:
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
    on the tensor's device.
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
            u, s, v = torch.svd_lowrank(a, q=q, niter=niter)
            return u[:, :r], s[:r], v[:, :r]
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
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


def select_linear_layers(model: nn.Module, target_modules: Sequence[str] | str | None) -> list[str]:
    """Names of the nn.Linear modules to upscale (all of them when no pattern is given)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    if target_modules is None:
        return linears
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    chosen = [n for n in linears if _matches(n, target_modules)]
    for p in target_modules:
        if not any(_matches(n, [p]) for n in linears):
            raise MergelabError(f"target_modules pattern '{p}' matches no nn.Linear layer of the base model")
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
               tokenizer_folder: str | os.PathLike | None = None, inputs: Sequence[str] = ()) -> str:
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


def _build_architecture(out_dir: str, model_class: str | None, attn_implementation: str) -> nn.Module:
    try:
        import transformers
        from transformers import AutoConfig, AutoModel
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise MergelabError(f"loading '{out_dir}' needs transformers: {e}") from e
    if not os.path.exists(os.path.join(out_dir, "config.json")):
        raise MergelabError(f"'{out_dir}' has no config.json: pass the architecture as load_smile(path, model=...)")
    config = AutoConfig.from_pretrained(out_dir)
    cls = getattr(transformers, model_class, None) if model_class else None
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls._from_config(config, **kw)
    return AutoModel.from_config(config, **kw)


def load_smile(out_dir: str | os.PathLike, model: nn.Module | None = None,
               attn_implementation: str | None = "eager", device: str | torch.device = "cpu") -> nn.Module:
    """Load a folder written by ``save_smile``: rebuild the architecture (transformers config, or
    the given ``model`` skeleton), swap the listed Linear layers for SmileLinear, load weights.
    Returns the model in eval mode."""
    from safetensors.torch import load_model

    out_dir = os.fspath(out_dir)
    cfg_path = os.path.join(out_dir, SMILE_CONFIG_NAME)
    if not os.path.exists(cfg_path):
        raise MergelabError(f"'{out_dir}' is not a SMILE model folder: no {SMILE_CONFIG_NAME}")
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise MergelabError(f"{cfg_path}: invalid JSON ({e})") from e
    if meta.get("method") != "smile" or meta.get("format_version") != FORMAT_VERSION:
        raise MergelabError(f"{cfg_path}: not a SMILE config of format version {FORMAT_VERSION}")
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
