"""PEFT LoRA adapters as merge inputs, and merged LoRA adapters as outputs.

An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, or ``adapter_model.bin``
read with ``weights_only=True``) on a shared base is opened as a lazy checkpoint: every adapted weight
reads as ``base + scaling * B @ A`` (scaling = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA,
``alpha_pattern`` honoured; transposed for ``fan_in_fan_out`` / Conv1D and embeddings, as PEFT does),
tensors the adapter stores in full (``modules_to_save``, trained biases) read as stored, and every
other tensor reads as the base's. So the engine merges adapters with any method, unchanged, one tensor
at a time.

``merge_to_adapter`` merges adapters and writes the result back as a PEFT adapter of a chosen rank (the
best rank-R approximation of each merged delta, by SVD). ``lora_experts`` hands the low-rank factors
to SMILE so that it needs no dense SVD.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
import yaml

from mergelab import svd_kernels as SK
from mergelab.errors import MergelabError
from mergelab.io import (Checkpoint, TensorInfo, atomic_output_dir, open_checkpoint, parse_size,
                         save_state_dict)

CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
# initialisations that rewrite the base weights: the adapter alone is then not a delta on the base
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")

Progress = Callable[[str, int, int], None]


def is_adapter(path: str | Path) -> bool:
    """True for a folder holding a PEFT adapter (config + weights)."""
    if not isinstance(path, (str, Path)):
        return False
    p = Path(path).expanduser()
    return p.is_dir() and (p / CONFIG).is_file() and any((p / w).is_file() for w in WEIGHT_FILES)


def _pattern_value(patterns: Mapping[str, object], module: str, default):
    """PEFT's ``get_pattern_key``: the first pattern matching the module name's end, else the default."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class LoraModule:
    """One adapted weight: ``delta = scaling * B @ A`` (transposed into the base layout if needed)."""
    module: str            # module name as the adapter knows it (PEFT target), e.g. encoder.layer.0.attention.self.query
    target: str            # tensor name in the base checkpoint, e.g. encoder.layer.0.attention.self.query.weight
    a_key: str
    b_key: str
    scaling: float
    transpose: bool        # base weight = (B @ A)^T layout (fan_in_fan_out, Conv1D, embeddings)
    embedding: bool
    bias_key: str | None = None   # lora_B.bias (lora_bias=True): bias delta = scaling * lora_B.bias


@dataclass
class LoraAdapter:
    """A parsed PEFT LoRA adapter, resolved against a base checkpoint's tensor names."""
    path: Path
    config: dict
    weights: Checkpoint
    modules: dict[str, LoraModule] = field(default_factory=dict)      # by target tensor name
    bias_deltas: dict[str, LoraModule] = field(default_factory=dict)  # bias tensor name -> module
    replaced: dict[str, str] = field(default_factory=dict)            # base tensor name -> adapter key

    @property
    def rank(self) -> int:
        return int(self.config.get("r", 0))

    def factors(self, target: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, scaling) in float32 with ``delta(target) == scaling * B @ A`` in the base layout."""
        m = self.modules[target]
        a = self.weights.get(m.a_key).to(torch.float32, copy=True)   # copies: the file may be closed later
        b = self.weights.get(m.b_key).to(torch.float32, copy=True)
        if m.transpose:
            a, b = b.T.contiguous(), a.T.contiguous()
        return a, b, m.scaling

    def delta(self, target: str) -> torch.Tensor:
        a, b, scaling = self.factors(target)
        return scaling * (b @ a)

    def close(self) -> None:
        self.weights.close()


def _resolve(name: str, base_names: set[str], where: str) -> str:
    """Map an adapter tensor name to the base's: exact, or the unique name differing by a prefix."""
    if name in base_names:
        return name
    found = [k for k in base_names if k.endswith("." + name) or name.endswith("." + k)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise MergelabError(f"{where}: adapter tensor {name!r} has no counterpart in the base model")
    raise MergelabError(f"{where}: adapter tensor {name!r} matches several base tensors "
                        f"({', '.join(sorted(found)[:3])})")


def load_adapter(path: str | Path, base: Checkpoint) -> LoraAdapter:
    """Parse an adapter folder and check it against the base (names, shapes); reads no weights."""
    folder = Path(path).expanduser()
    if not is_adapter(folder):
        raise MergelabError(f"{folder}: not a PEFT adapter folder (needs {CONFIG} and adapter_model.safetensors)")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except ValueError as e:
        raise MergelabError(f"{folder / CONFIG}: invalid JSON ({e})") from None
    where = str(folder)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise MergelabError(f"{where}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    if config.get("use_dora"):
        raise MergelabError(f"{where}: DoRA adapters (use_dora) are not supported")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise MergelabError(f"{where}: init_lora_weights={init!r} changes the base weights; convert the adapter "
                            "to a plain LoRA first (PEFT: path_initial_model_for_weight_conversion)")
    for key in ("layer_replication", "target_parameters", "trainable_token_indices"):
        if config.get(key):
            raise MergelabError(f"{where}: adapters with {key} are not supported")
    weight_file = next(folder / w for w in WEIGHT_FILES if (folder / w).is_file())
    weights = open_checkpoint(weight_file)
    try:
        adapter = LoraAdapter(folder, config, weights)
        _index(adapter, base, where)
    except BaseException:
        weights.close()
        raise
    return adapter


def _index(adapter: LoraAdapter, base: Checkpoint, where: str) -> None:
    config = adapter.config
    base_names = set(base.keys())
    pairs: dict[str, dict[str, str]] = {}
    for key in adapter.weights.keys():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.(weight|bias)|(.+)\.(lora_embedding_A|lora_embedding_B)", name)
        if m:
            module = m.group(1) or m.group(4)
            part = m.group(2) or m.group(5)
            kind = "bias" if m.group(3) == "bias" else part[-1]
            if part == "lora_A" and kind == "bias":
                raise MergelabError(f"{where}: unexpected tensor {key!r}")
            pairs.setdefault(module, {})[kind] = key
            if part.startswith("lora_embedding"):
                pairs[module]["embedding"] = "1"
            continue
        if ".lora_" in name or "lora_magnitude_vector" in name or "token_adapter" in name:
            raise MergelabError(f"{where}: tensor {key!r} is of an unsupported LoRA variant")
        target = _resolve(name.replace(".base_layer.", "."), base_names, where)
        if adapter.weights.shape(key) != base.shape(target):
            raise MergelabError(f"{where}: tensor {key!r} has shape {list(adapter.weights.shape(key))}, "
                                f"the base's {target!r} has {list(base.shape(target))}")
        adapter.replaced[target] = key
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    for module, parts in sorted(pairs.items()):
        if "A" not in parts or "B" not in parts:
            raise MergelabError(f"{where}: module {module!r} has lora_{'B' if 'A' in parts else 'A'} but no "
                                f"lora_{'A' if 'A' in parts else 'B'}")
        a_shape, b_shape = adapter.weights.shape(parts["A"]), adapter.weights.shape(parts["B"])
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise MergelabError(f"{where}: module {module!r}: only LoRA on Linear, Conv1D and Embedding layers is "
                                f"supported (lora_A has shape {list(a_shape)})")
        r = a_shape[0]
        if b_shape[1] != r:
            raise MergelabError(f"{where}: module {module!r}: lora_A {list(a_shape)} and lora_B {list(b_shape)} "
                                "do not share the rank")
        target = _resolve(module + ".weight", base_names, where)
        shape = tuple(base.shape(target))
        product = (b_shape[0], a_shape[1])
        embedding = "embedding" in parts
        if product != shape and product[::-1] != shape:
            raise MergelabError(f"{where}: module {module!r}: B @ A has shape {list(product)}, the base's "
                                f"{target!r} has {list(shape)}")
        transpose = product != shape or (product[0] == product[1] and (embedding or fan_in_fan_out))
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        lm = LoraModule(module, target, parts["A"], parts["B"], scaling, transpose, embedding, parts.get("bias"))
        adapter.modules[target] = lm
        if lm.bias_key is not None:
            bias_target = _resolve(module + ".bias", base_names, where)
            adapter.bias_deltas[bias_target] = lm
    overlap = set(adapter.modules) & set(adapter.replaced)
    if overlap:
        raise MergelabError(f"{where}: tensor {sorted(overlap)[0]!r} is both LoRA-adapted and stored in full")


class LoraCheckpoint(Checkpoint):
    """A base checkpoint with one adapter applied, read lazily tensor by tensor.

    ``dtype()`` reports the base's dtype (the one a merged model is written in), but adapted tensors come
    back from ``get()`` in float32 so that a small delta is not rounded away by a bfloat16 base.
    """

    def __init__(self, adapter: LoraAdapter, base: Checkpoint):
        super().__init__(adapter.path, {}, {})
        self.adapter, self.base = adapter, base

    def keys(self) -> list[str]:
        return self.base.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def file_of(self, name: str) -> str:
        return str(self.adapter.path)

    @property
    def fresh_tensors(self) -> bool:
        """Adapted tensors are new memory; the others are the base's or the adapter file's."""
        return self.base.fresh_tensors and self.adapter.weights.fresh_tensors

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        ad = self.adapter
        if name in ad.modules or name in ad.bias_deltas or name in ad.replaced:
            full = self._get_adapted(name)
            return full if rows is None else full[rows[0]:rows[1]]
        return self.base.get(name, rows)

    def _get_adapted(self, name: str) -> torch.Tensor:
        ad = self.adapter
        if name in ad.modules:
            base = self.base.get(name)
            return base.to(torch.promote_types(base.dtype, torch.float32)) + ad.delta(name)
        if name in ad.bias_deltas:
            m = ad.bias_deltas[name]
            base = self.base.get(name)
            bias = ad.weights.get(m.bias_key).to(torch.float32)
            return base.to(torch.promote_types(base.dtype, torch.float32)) + m.scaling * bias
        return ad.weights.get(ad.replaced[name])

    def close(self) -> None:
        self.adapter.close()

    def __repr__(self) -> str:
        return f"LoraCheckpoint({self.adapter.path}, {len(self.adapter.modules)} adapted tensors)"


def open_model(path, base: Checkpoint | None) -> Checkpoint:
    """Open a model of a recipe: a PEFT adapter folder on ``base``, else whatever ``open_checkpoint`` takes."""
    if is_adapter(path):
        if base is None:
            raise MergelabError(f"{path}: a LoRA adapter needs the recipe's base_model to apply to")
        return LoraCheckpoint(load_adapter(path, base), base)
    return open_checkpoint(path)


def lora_experts(adapter: str | Path | LoraAdapter, base: Checkpoint | str | Path | None = None
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Low-rank factors of every adapted weight, for SMILE experts without a dense SVD.

    Returns ``{module_name: (A [r, d_in], B [d_out, r], scaling)}`` in float32 with
    ``base_weight_delta == scaling * B @ A`` in the base weight's own layout. Module names are the base's
    tensor names without ``.weight`` when a base is given, else the adapter's module names.
    ``svd_kernels.factored_svd(B, A, scaling)`` gives the exact SVD of that delta in O((m+n) r^2).
    """
    if isinstance(adapter, LoraAdapter):
        ad, own = adapter, False
    else:
        base_ckpt = open_checkpoint(base) if base is not None else _AnyBase(adapter)
        try:
            ad, own = load_adapter(adapter, base_ckpt), True
        finally:
            if base_ckpt is not base:
                base_ckpt.close()   # only names and shapes were needed; closing the mmap is harmless
    try:
        out = {}
        for target in ad.modules:
            name = target[: -len(".weight")] if target.endswith(".weight") else target
            out[name] = ad.factors(target)
        return out
    finally:
        if own:
            ad.close()


def smile_expert_from_lora(a: torch.Tensor, b: torch.Tensor, scaling: float, k: int, gate_k: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SMILE's expert and router for ``dW = scaling * B @ A``, from the factors (no dense SVD).

    Returns ``(gate [gate_k, d_in], expert_A [k, d_in], expert_B [d_out, k])`` as SMILE builds them from
    ``svd(dW) = U S V^T`` (ALGORITHMS.md 5.1): gate = V[:, :gate_k]^T, expert_A = (S[:k] V[:, :k])^T,
    expert_B = U[:, :k]. Beyond the adapter's rank the singular values are zero: those rows/columns are
    zero here (a dense SVD would fill them with arbitrary null-space vectors).
    """
    u, s, vh = SK.factored_svd(b, a, scaling)
    j = s.numel()
    d_out, d_in = b.shape[0], a.shape[1]
    gate = a.new_zeros(gate_k, d_in)
    gate[: min(j, gate_k)] = vh[:gate_k]
    expert_a = a.new_zeros(k, d_in)
    expert_a[: min(j, k)] = (s[:, None] * vh)[:k]
    expert_b = b.new_zeros(d_out, k)
    expert_b[:, : min(j, k)] = u[:, :k]
    return gate, expert_a, expert_b


class _AnyBase(Checkpoint):
    """Stand-in base for reading an adapter alone: every name resolves to itself, shapes from B @ A."""

    def __init__(self, adapter_path: str | Path):
        super().__init__(None, {}, {})
        folder = Path(adapter_path).expanduser()
        if not is_adapter(folder):
            raise MergelabError(f"{folder}: not a PEFT adapter folder (needs {CONFIG} and adapter_model.safetensors)")
        weight_file = next(folder / w for w in WEIGHT_FILES if (folder / w).is_file())
        try:
            fan_in_fan_out = bool(json.loads((folder / CONFIG).read_text()).get("fan_in_fan_out", False))
        except ValueError as e:
            raise MergelabError(f"{folder / CONFIG}: invalid JSON ({e})") from None
        shapes: dict[str, tuple[int, ...]] = {}
        with open_checkpoint(weight_file) as w:
            for key in w.keys():
                name = key[len(PREFIX):] if key.startswith(PREFIX) else key
                m = re.fullmatch(r"(.+)\.lora_A\.weight", name)
                e = re.fullmatch(r"(.+)\.lora_embedding_A", name)
                if m:
                    b_key = key.replace(".lora_A.weight", ".lora_B.weight")
                    out_in = (w.shape(b_key)[0], w.shape(key)[1])
                    shapes[m.group(1) + ".weight"] = out_in[::-1] if fan_in_fan_out else out_in
                elif e:
                    b_key = key.replace("lora_embedding_A", "lora_embedding_B")
                    shapes[e.group(1) + ".weight"] = (w.shape(key)[1], w.shape(b_key)[0])
                elif ".lora_" not in name:
                    shapes[name.replace(".base_layer.", ".")] = tuple(w.shape(key))
        self._shapes = shapes

    def keys(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def info(self, name: str) -> TensorInfo:
        return TensorInfo(torch.float32, self._shapes[name])


class _Subset(Checkpoint):
    """A view of a checkpoint restricted to some tensor names."""

    def __init__(self, inner: Checkpoint, names: list[str]):
        super().__init__(inner.path, {}, {})
        self.inner, self.names = inner, [n for n in inner.keys() if n in set(names)]

    def keys(self) -> list[str]:
        return list(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def info(self, name: str) -> TensorInfo:
        return self.inner.info(name)

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self.inner.get(name, rows)

    @property
    def fresh_tensors(self) -> bool:
        return self.inner.fresh_tensors

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- merged adapter of a chosen rank

@dataclass
class AdapterSummary:
    method: str
    rank: int
    modules: int
    out_dir: Path
    seconds: float
    max_relative_error: float      # worst ||delta - rank-R approximation||_F / ||delta||_F over modules
    mean_relative_error: float
    bytes_written: int

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["out_dir"] = str(self.out_dir)
        return d


def _lora_config(first: dict, rank: int, targets: list[str], fan_in_fan_out: bool) -> dict:
    config = dict(first)
    config.update({
        "r": rank, "lora_alpha": rank, "target_modules": targets, "rank_pattern": {}, "alpha_pattern": {},
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "bias": "none", "lora_bias": False,
        "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
        "fan_in_fan_out": fan_in_fan_out, "init_lora_weights": True, "inference_mode": True,
        "peft_type": "LORA",
    })
    return config


def merge_to_adapter(recipe, out_dir: str | Path, rank: int, *, force: bool = False, compat: str | None = None,
                     device: str | None = None, threads: int | None = None,
                     progress: Progress | None = None) -> AdapterSummary:
    """Merge the adapters a recipe lists with its method; write a PEFT adapter of rank ``rank``.

    The merge is the same as ``mergelab merge`` on the adapters (dense deltas, any method); each adapted
    module's merged delta is then replaced by its best rank-``rank`` approximation (truncated SVD,
    Eckart-Young), stored as ``B = U sqrt(S)``, ``A = sqrt(S) Vh`` with ``lora_alpha = r``.
    """
    from mergelab.engine import check_structure, run_merge
    from mergelab.methods import get_method
    from mergelab.recipe import Recipe, load_recipe

    started = time.perf_counter()
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MergelabError(f"--rank must be a positive integer, got {rank!r}")
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, compat=compat)
    method = get_method(recipe.method)
    g, per = recipe.resolved()
    where = str(recipe.source or "recipe")
    if recipe.base_model is None:
        raise MergelabError(f"{where}: lora-merge needs a 'base_model' (the model the adapters apply to)")
    for i, m in enumerate(recipe.models):
        if not is_adapter(m.path):
            raise MergelabError(f"{where}: models[{i}] ({m.path}) is not a PEFT adapter folder; lora-merge "
                                "merges adapters (use 'mergelab merge' for full models)")
    base = open_checkpoint(recipe.base_model)
    adapters: list[LoraAdapter] = []
    try:
        for m in recipe.models:
            adapters.append(load_adapter(m.path, base))
        for ad in adapters:
            if ad.replaced or ad.bias_deltas:
                name = next(iter(ad.replaced or ad.bias_deltas))
                raise MergelabError(f"{ad.path}: stores tensor {name!r} in full (modules_to_save or trained biases); "
                                    "a merged LoRA adapter cannot hold it, use 'mergelab merge' for a full model")
        fifo = {bool(ad.config.get("fan_in_fan_out", False)) for ad in adapters}
        if len(fifo) > 1:
            raise MergelabError(f"{where}: the adapters disagree on fan_in_fan_out")
        targets: dict[str, LoraModule] = {}
        for ad in adapters:
            for t, lm in ad.modules.items():
                prev = targets.setdefault(t, lm)
                if prev.transpose != lm.transpose or prev.embedding != lm.embedding:
                    raise MergelabError(f"{ad.path}: module {lm.module!r} has a different layout than in "
                                        f"{adapters[0].path}")
        models: list[Checkpoint] = [LoraCheckpoint(ad, base) for ad in adapters]
        check_structure(base, models, recipe.base_model, [m.path for m in recipe.models])
        merge_base: Checkpoint = base
        if method.global_trim is None or method.global_trim(g, per, recipe.compat) is None:
            # every tensor no adapter touches merges to the base: only a whole-model trim (TIES) needs them
            merge_base = _Subset(base, list(targets))
            models = [_Subset(m, list(targets)) for m in models]

        factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        lock = threading.Lock()
        changed: list[str] = []

        def factorise(job, merged: torch.Tensor) -> None:
            if job.name not in targets:
                scale = float(job.base.abs().max()) if job.base.numel() else 0.0
                if job.base.numel() and float((merged - job.base).abs().max()) > 1e-5 * max(1.0, scale):
                    with lock:
                        changed.append(job.name)
                return
            lm = targets[job.name]
            delta = merged - job.base
            mat = delta.T if lm.transpose else delta      # the layout of B @ A
            u, s, vh = SK.svd(mat, rank, "auto", generator=job.generator(0))
            root = s.sqrt()
            b = torch.zeros(mat.shape[0], rank, dtype=torch.float32)
            a = torch.zeros(rank, mat.shape[1], dtype=torch.float32)
            b[:, : s.numel()] = (u * root).cpu()
            a[: s.numel()] = (root[:, None] * vh).cpu()
            approx = b @ a
            norm = float(torch.linalg.matrix_norm(mat))
            err = float(torch.linalg.matrix_norm(mat.cpu() - approx)) / norm if norm > 0 else 0.0
            with lock:
                factors[job.name] = (a, b, err)

        def merge_tensor(job):
            merged = method.merge_tensor(job)
            factorise(job, merged)
            return merged

        # whole tensors: each merged delta is factorised by one SVD
        wrapped = dataclasses.replace(method, merge_tensor=merge_tensor, chunkable=lambda params, compat: False)
        run_merge(wrapped, merge_base, models, g, per, recipe.compat, lambda name, t, row: None,
                  out_dtype=torch.float32,
                  device=device or "cpu", threads=threads, progress=progress,
                  labels=[m.path for m in recipe.models], base_label=recipe.base_model)
        if changed:
            raise MergelabError(f"{method.name} changed tensor {sorted(changed)[0]!r}, which no adapter touches; "
                                "the result is not a LoRA adapter (use 'mergelab merge' for a full model)")

        tensors: dict[str, torch.Tensor] = {}
        for t, lm in sorted(targets.items()):
            a, b, _ = factors[t]
            if lm.embedding:
                tensors[f"{PREFIX}{lm.module}.lora_embedding_A"] = a.contiguous()
                tensors[f"{PREFIX}{lm.module}.lora_embedding_B"] = b.contiguous()
            else:
                tensors[f"{PREFIX}{lm.module}.lora_A.weight"] = a.contiguous()
                tensors[f"{PREFIX}{lm.module}.lora_B.weight"] = b.contiguous()
        config = _lora_config(adapters[0].config, rank, sorted(lm.module for lm in targets.values()), fifo.pop())
        with atomic_output_dir(out_dir, force=force) as tmp:
            written = save_state_dict(tensors, tmp, parse_size("1000TB"), metadata={"mergelab_method": method.name})
            (tmp / "model.safetensors").rename(tmp / "adapter_model.safetensors")
            (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
            (tmp / "mergelab_recipe.yaml").write_text(yaml.safe_dump(
                {**recipe.raw, "compat": recipe.compat, "lora_rank": rank, "resolved_parameters": g,
                 "resolved_model_parameters": per}, sort_keys=False))
        errors = [e for _, _, e in factors.values()]
        return AdapterSummary(method=method.name, rank=rank, modules=len(targets),
                              out_dir=Path(out_dir).expanduser().resolve(), seconds=time.perf_counter() - started,
                              max_relative_error=max(errors, default=0.0),
                              mean_relative_error=sum(errors) / len(errors) if errors else 0.0,
                              bytes_written=written)
    finally:
        for ad in adapters:
            ad.close()
        base.close()
