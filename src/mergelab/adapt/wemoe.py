"""WEMoE: weight-ensembling mixture of experts (Tang et al., ICML 2024, arXiv 2402.00433; ALGORITHMS-2.md 15.5).

Every MLP block becomes a module whose weights are built per batch from its input:

    lambda = mean over tokens of router(h)            [B, T]   (no softmax; mean over the batch too
                                                               with ``batch_reduce``, FusionBench default)
    W_mlp  = W0_mlp + sum_t lambda_t tau_t^mlp        (tau_t = fine-tuned MLP - pre-trained MLP)

router(h) = fc2(ReLU(fc1(h))) (fc1: d -> d, fc2: d -> T; weights ~ N(0, 0.01^2), fc1 bias 0, fc2 bias
``init_lambda``); one hidden layer fewer with ``router_hidden_layers`` 1, a free vector with 0. Every
other parameter is task arithmetic at ``init_lambda``. Only the routers are trained, by Adam on the
summed prediction entropy of unlabelled test batches of every task (``wemoe_adapt``; the entropy and the
endless loaders are AdaMerging's).

"MLP block" on any ``nn.Module``: a child named ``mlp`` of a residual block (CLIP, GPT-2, LLaMA, ViT),
or for BERT-style blocks the pair ``intermediate`` + ``output.dense`` sharing one router (fed with the
``intermediate``'s input, the hidden states); or explicit ``groups`` of module names. Blocks are found
from names as in ``methods.lines``.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from mergelab.adapt.functional import Cycle, as_logits, entropy
from mergelab.errors import MergelabError
from mergelab.methods.lines import DEFAULT_BLOCK_PATTERN

CONFIG_NAME = "wemoe_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


class WERouter(nn.Module):
    """h [.., d] -> merging weights [.., T]."""

    def __init__(self, d: int, num_tasks: int, hidden_layers: int = 2, init_lambda: float = 0.3,
                 generator: torch.Generator | None = None):
        super().__init__()
        if hidden_layers not in (0, 1, 2):
            raise MergelabError(f"router_hidden_layers must be 0, 1 or 2, got {hidden_layers}")
        self.hidden_layers, self.num_tasks = hidden_layers, num_tasks
        if hidden_layers == 0:
            self.lam = nn.Parameter(torch.full((num_tasks,), float(init_lambda)))
            return
        if hidden_layers == 2:
            self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, num_tasks)
        with torch.no_grad():
            for lin, b in ((getattr(self, "fc1", None), 0.0), (self.fc2, float(init_lambda))):
                if lin is not None:
                    lin.weight.normal_(0.0, 0.01, generator=generator)
                    lin.bias.fill_(b)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.hidden_layers == 0:
            return self.lam.expand(*h.shape[:-1], self.num_tasks)
        if self.hidden_layers == 2:
            h = torch.relu(self.fc1(h))
        return self.fc2(h)


class _Shared:
    """The merging weights the group's entry module computed for the current forward."""
    lam: torch.Tensor | None = None


def _buffer_name(param: str) -> str:
    return "tv__" + param.replace(".", "__")


class WeightEnsembledModule(nn.Module):
    """A module run with W0 + sum_t lambda_t tau_t; the entry of a group owns the router."""

    def __init__(self, module: nn.Module, task_vectors: Mapping[str, torch.Tensor], shared: _Shared,
                 router: WERouter | None = None, batch_reduce: bool = True):
        super().__init__()
        self.module = module
        self.router = router
        self.batch_reduce = batch_reduce
        self._shared = shared
        self.param_names = [n for n, _ in module.named_parameters()]
        missing = [n for n in self.param_names if n not in task_vectors]
        if missing:
            raise MergelabError(f"WEMoE: no task vectors for parameter '{missing[0]}'")
        for n in self.param_names:
            self.register_buffer(_buffer_name(n), task_vectors[n].detach().clone())
        module.requires_grad_(False)

    @property
    def num_tasks(self) -> int:
        return getattr(self, _buffer_name(self.param_names[0])).shape[0]

    def merging_weights(self, h: torch.Tensor) -> torch.Tensor:
        lam = self.router(h)
        lam = lam.reshape(lam.shape[0], -1, lam.shape[-1]).mean(1)        # mean over tokens -> [B, T]
        return lam.mean(0) if self.batch_reduce else lam

    def forward(self, *args, **kwargs):
        if self.router is not None:
            self._shared.lam = self.merging_weights(args[0] if args else next(iter(kwargs.values())))
        lam = self._shared.lam
        if lam is None:
            raise MergelabError("WEMoE: a group member ran before its router")
        base = dict(self.module.named_parameters())
        if lam.dim() == 1:
            params = {n: base[n] + torch.tensordot(lam.to(base[n].dtype), getattr(self, _buffer_name(n)), dims=1)
                      for n in self.param_names}
            return functional_call(self.module, params, args, kwargs)
        outs = []                                   # per-sample merged weights (batch_reduce off)
        for i in range(lam.shape[0]):
            params = {n: base[n] + torch.tensordot(lam[i].to(base[n].dtype), getattr(self, _buffer_name(n)), dims=1)
                      for n in self.param_names}
            a = tuple(x[i:i + 1] if isinstance(x, torch.Tensor) else x for x in args)
            kw = {k: v[i:i + 1] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            outs.append(functional_call(self.module, params, a, kw))
        return torch.cat(outs, 0)


def find_mlp_groups(model: nn.Module, block_pattern: str = DEFAULT_BLOCK_PATTERN) -> list[list[str]]:
    """One group per residual block: ``[block.mlp]`` or BERT's ``[block.intermediate, block.output.dense]``."""
    modules = dict(model.named_modules())
    blocks = []
    for n in modules:
        m = re.search(block_pattern, n + ".")
        if m and n[:m.end(1)].lstrip(".") == n:
            blocks.append(n)
    groups = []
    for b in blocks:
        if f"{b}.mlp" in modules:
            groups.append([f"{b}.mlp"])
        elif f"{b}.intermediate" in modules and f"{b}.output.dense" in modules:
            groups.append([f"{b}.intermediate", f"{b}.output.dense"])
    if not groups:
        raise MergelabError("WEMoE: no MLP blocks found (no 'mlp' or 'intermediate'/'output.dense' children of "
                            "residual blocks); pass groups=[[module names], ...]")
    return groups


def _input_features(module: nn.Module) -> int:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    raise MergelabError("WEMoE: the first module of a group has no nn.Linear (cannot size its router)")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _install(model: nn.Module, groups: Sequence[Sequence[str]], tvs: Mapping[str, torch.Tensor], num_tasks: int,
             router_hidden_layers: int, init_lambda: float, batch_reduce: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for group in groups:
        shared = _Shared()
        for j, name in enumerate(group):
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                raise MergelabError(f"WEMoE: the model has no module '{name}'") from None
            router = None
            if j == 0:
                w = next(mod.parameters())
                router = WERouter(_input_features(mod), num_tasks, router_hidden_layers, init_lambda, gen).to(
                    device=w.device, dtype=w.dtype)
            local = {n: tvs[f"{name}.{n}"] for n, _ in mod.named_parameters()}
            _set_submodule(model, name, WeightEnsembledModule(mod, local, shared, router, batch_reduce))


@torch.no_grad()
def upscale_to_wemoe(base_model: nn.Module, finetuned: Sequence[Mapping[str, torch.Tensor]], *,
                     init_lambda: float = 0.3, router_hidden_layers: int = 2, batch_reduce: bool = True,
                     groups: Sequence[Sequence[str]] | None = None, block_pattern: str = DEFAULT_BLOCK_PATTERN,
                     seed: int = 0, inplace: bool = False) -> nn.Module:
    """The WEMoE model of ``base_model`` and fine-tuned state dicts (routers untrained: every lambda_t
    starts near ``init_lambda``, i.e. task arithmetic). Only router parameters require gradients."""
    if not finetuned:
        raise MergelabError("WEMoE needs at least one fine-tuned model")
    model = base_model if inplace else copy.deepcopy(base_model)
    groups = [list(g) for g in (groups or find_mlp_groups(model, block_pattern))]
    base_sd = model.state_dict()
    for i, sd in enumerate(finetuned, 1):
        missing = [k for k, v in base_sd.items() if v.is_floating_point() and k not in sd]
        if missing:
            raise MergelabError(f"fine-tuned model {i} lacks tensor '{missing[0]}'")
    in_groups = tuple(n + "." for g in groups for n in g)
    tvs = {}
    body = {}
    for k, v in model.named_parameters():
        stacked = torch.stack([sd[k].to(v.device, torch.float32) - v.float() for sd in finetuned])
        if k.startswith(in_groups):
            tvs[k] = stacked.to(v.dtype)
        else:
            body[k] = (v.float() + init_lambda * stacked.sum(0)).to(v.dtype)
    for k, p in model.named_parameters():
        if k in body:
            p.copy_(body[k])
    model.requires_grad_(False)
    _install(model, groups, tvs, len(finetuned), router_hidden_layers, init_lambda, batch_reduce, seed)
    model.wemoe_info = {"groups": groups, "num_tasks": len(finetuned), "init_lambda": init_lambda,
                        "router_hidden_layers": router_hidden_layers, "batch_reduce": batch_reduce}
    return model


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, WERouter) for p in m.parameters()]


def _run(model: nn.Module, batch, device):
    from mergelab.adapt.functional import _to
    batch = _to(batch, device)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def wemoe_adapt(model: nn.Module, task_loaders: Sequence[Iterable], heads: Sequence[Callable] | None = None, *,
                steps: int = 1000, lr: float = 1e-4, device: str | torch.device | None = None,
                progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Train the routers: each step, one unlabelled batch per task, backward of its entropy (gradients
    accumulated over tasks), one Adam step (FusionBench: lr 1e-4, 1000 steps, batch 16). Returns the history."""
    params = router_parameters(model)
    if not params:
        raise MergelabError("WEMoE: the model has no routers (build it with upscale_to_wemoe)")
    if heads is not None and len(heads) != len(task_loaders):
        raise MergelabError(f"{len(task_loaders)} data loaders but {len(heads)} heads")
    for p in params:
        p.requires_grad_(True)
    if device is not None:
        model.to(device)
    cycles = [Cycle(ld, f"data loader {t + 1}") for t, ld in enumerate(task_loaders)]
    opt = torch.optim.Adam(params, lr=lr)
    was_training = model.training
    model.eval()
    history = []
    try:
        for step in range(steps):
            t0 = time.perf_counter()
            opt.zero_grad()
            per_task = []
            for t, cyc in enumerate(cycles):
                out = _run(model, next(cyc), device)
                loss = entropy(as_logits(out if heads is None else heads[t](out)))
                loss.backward()
                per_task.append(float(loss.detach()))
            opt.step()
            rec = {"step": step + 1, "entropy": sum(per_task) / len(per_task), "entropy_per_task": per_task,
                   "seconds": time.perf_counter() - t0}
            history.append(rec)
            if progress is not None:
                progress(rec)
    finally:
        model.train(was_training)
    return history


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Elements held: trainable router parameters, frozen parameters, task-vector buffers."""
    routers = sum(p.numel() for p in router_parameters(model))
    params = sum(p.numel() for p in model.parameters())
    tvs = sum(b.numel() for n, b in model.named_buffers() if n.rsplit(".", 1)[-1].startswith("tv__"))
    return {"router": routers, "parameters": params, "task_vector_buffers": tvs, "total": params + tvs}


def write_wemoe(model: nn.Module, folder: str | os.PathLike, tokenizer_folder: str | os.PathLike | None = None) -> None:
    """The files of ``save_wemoe`` written into an existing folder (e.g. a command's temporary output
    folder, which it renames itself): ``config.json``, ``model.safetensors``, ``wemoe_config.json``,
    and the tokenizer files found in ``tokenizer_folder``."""
    from safetensors.torch import save_file

    from mergelab.io import TOKENIZER_FILES
    info = getattr(model, "wemoe_info", None)
    if not info:
        raise MergelabError("save_wemoe: not a WEMoE model (no wemoe_info)")
    folder = os.fspath(folder)
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "save_pretrained"):
        cfg.save_pretrained(folder)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()},
              os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
    meta = {"format_version": FORMAT_VERSION, "method": "wemoe", "model_class": type(model).__name__,
            **info, "parameter_counts": parameter_counts(model)}
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        f.write(json.dumps(meta, indent=2))
    if tokenizer_folder is not None:
        for name in TOKENIZER_FILES:
            src = os.path.join(os.fspath(tokenizer_folder), name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(folder, name))


def save_wemoe(model: nn.Module, out_dir: str | os.PathLike, overwrite: bool = False,
               tokenizer_folder: str | os.PathLike | None = None) -> str:
    """``config.json`` (transformers config, when present), ``model.safetensors`` (weights, routers and
    task vectors) and ``wemoe_config.json``, written atomically."""
    from mergelab.io import atomic_output_dir
    if not getattr(model, "wemoe_info", None):
        raise MergelabError("save_wemoe: not a WEMoE model (no wemoe_info)")
    with atomic_output_dir(out_dir, force=overwrite) as tmp:
        write_wemoe(model, tmp, tokenizer_folder)
    return os.path.abspath(os.path.expanduser(os.fspath(out_dir)))


def load_wemoe(out_dir: str | os.PathLike, model: nn.Module | None = None,
               attn_implementation: str | None = "eager", device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a folder written by ``save_wemoe``: the architecture (transformers config, or the given
    skeleton), its MLP groups swapped for WEMoE modules, the weights loaded strictly; eval mode."""
    from safetensors.torch import load_file

    from mergelab.upscale.smile import _build_architecture, read_folder_config
    out_dir = os.fspath(out_dir)
    meta = read_folder_config(out_dir, CONFIG_NAME, "wemoe", FORMAT_VERSION, "WEMoE")
    if model is None:
        model = _build_architecture(out_dir, meta.get("model_class"), attn_implementation)
    T = meta["num_tasks"]
    tvs = {f"{name}.{n}": torch.zeros((T, *p.shape), dtype=p.dtype)
           for g in meta["groups"] for name in g for n, p in model.get_submodule(name).named_parameters()}
    _install(model, meta["groups"], tvs, T, meta["router_hidden_layers"], meta["init_lambda"],
             meta["batch_reduce"], 0)
    try:
        model.load_state_dict(load_file(os.path.join(out_dir, WEIGHTS_NAME)), strict=True)
    except (RuntimeError, FileNotFoundError) as e:
        why = " ".join(ln.strip() for ln in str(e).splitlines())[:300]
        raise MergelabError(f"{out_dir}: weights do not fit the architecture ({why})") from e
    model.requires_grad_(False)
    model.wemoe_info = {k: meta[k] for k in ("groups", "num_tasks", "init_lambda", "router_hidden_layers",
                                             "batch_reduce")}
    return model.to(device).eval()


def wemoe(base_model: nn.Module, finetuned: Sequence[Mapping[str, torch.Tensor]], task_loaders: Sequence[Iterable],
          heads: Sequence[Callable] | None = None, *, steps: int = 1000, lr: float = 1e-4, init_lambda: float = 0.3,
          router_hidden_layers: int = 2, batch_reduce: bool = True, groups=None, device=None, seed: int = 0,
          progress=None) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Build and adapt: (WEMoE model, training history)."""
    model = upscale_to_wemoe(base_model, finetuned, init_lambda=init_lambda, router_hidden_layers=router_hidden_layers,
                             batch_reduce=batch_reduce, groups=groups, seed=seed)
    history = wemoe_adapt(model, task_loaders, heads, steps=steps, lr=lr, device=device, progress=progress)
    model.requires_grad_(False)
    return model.eval(), history
