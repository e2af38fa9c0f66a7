"""PEFT LoRA adapters as merge inputs.

An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, or ``adapter_model.bin``
read with ``weights_only=True``) on a shared base is opened as a lazy checkpoint: every adapted weight
reads as ``base + scaling * B @ A`` (scaling = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA,
``alpha_pattern`` honoured; transposed for ``fan_in_fan_out`` / Conv1D and embeddings, as PEFT does),
tensors the adapter stores in full (``modules_to_save``, trained biases) read as stored, and every
other tensor reads as the base's. So the engine merges adapters with any method, unchanged, one tensor
at a time.

``lora_experts`` hands the low-rank factors to SMILE so that it needs no dense SVD;
``mergelab.engine.lora_export`` writes merged adapters back.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from mergelab.errors import MergelabError
from mergelab.io.checkpoint import Checkpoint, TensorInfo, open_checkpoint

CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
# initialisations that rewrite the base weights: the adapter alone is then not a delta on the base
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def is_adapter(path: str | Path) -> bool:
    """True for a folder holding a PEFT adapter (config + weights)."""
    if not isinstance(path, (str, Path)):
        return False
    p = Path(path).expanduser()
    return p.is_dir() and (p / CONFIG).is_file() and any((p / w).is_file() for w in WEIGHT_FILES)


def _pattern_value(patterns: Mapping[str, object], module: str, default):
    """PEFT's ``get_pattern_key``: the first pattern matching the module name's end, else the default."""
    for key, value in (patterns or {}).items():
        try:
            hit = re.match(rf"(.*\.)?({key})$", module)
        except re.error as e:
            raise MergelabError(f"pattern {key!r} of the adapter config is not a valid regular expression ({e})") from None
        if hit:
            return value
    return default


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_adapter_config(folder: Path) -> dict:
    """``adapter_config.json`` with the types mergelab relies on checked: one line naming the key otherwise."""
    path = folder / CONFIG
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise MergelabError(f"{path}: invalid JSON ({str(e)[:120]})") from None
    except OSError as e:
        raise MergelabError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(config, dict):
        raise MergelabError(f"{path}: must be a JSON object, got {type(config).__name__}")
    r = config.get("r")
    if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r < 1):
        raise MergelabError(f"{path}: r must be a positive integer, got {r!r}")
    if "lora_alpha" in config and not _number(config["lora_alpha"]):
        raise MergelabError(f"{path}: lora_alpha must be a finite number, got {config['lora_alpha']!r}")
    for key, ok in (("alpha_pattern", _number), ("rank_pattern", lambda v: isinstance(v, int) and
                                                  not isinstance(v, bool) and v >= 1)):
        pat = config.get(key)
        if pat is None:
            continue
        if not isinstance(pat, dict) or not all(isinstance(k, str) and ok(v) for k, v in pat.items()):
            raise MergelabError(f"{path}: {key} must map module patterns to {'numbers' if key[0] == 'a' else 'ranks'}")
    for key in ("fan_in_fan_out", "use_rslora", "use_dora"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise MergelabError(f"{path}: {key} must be true or false, got {config[key]!r}")
    if config.get("peft_type") is not None and not isinstance(config["peft_type"], str):
        raise MergelabError(f"{path}: peft_type must be a string, got {config['peft_type']!r}")
    return config


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
    config = read_adapter_config(folder)
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
        if r < 1:
            raise MergelabError(f"{where}: module {module!r}: lora_A has rank 0")
        said = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r"))
        if said is not None and said != r:
            raise MergelabError(f"{where}: module {module!r}: the config says r={said}, its tensors have rank {r}")
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

    def __init__(self, adapter: LoraAdapter, base: Checkpoint, owns_base: bool = False):
        super().__init__(adapter.path, {}, {})
        self.adapter, self.base, self.owns_base = adapter, base, owns_base

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
        if self.owns_base:
            self.base.close()

    def __repr__(self) -> str:
        return f"LoraCheckpoint({self.adapter.path}, {len(self.adapter.modules)} adapted tensors)"


def open_model(path, base: Checkpoint | None, lora: str | Path | None = None) -> Checkpoint:
    """Open a model of a recipe: a PEFT adapter folder on ``base``, else whatever ``open_checkpoint`` takes;
    ``lora`` applies an adapter on the fly to that model (mergekit's ``model+lora``)."""
    if lora is not None:
        model = open_checkpoint(path)
        try:
            return LoraCheckpoint(load_adapter(lora, model), model, owns_base=True)
        except BaseException:
            model.close()
            raise
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
    ``mergelab.kernels.svd.factored_svd(B, A, scaling)`` gives the exact SVD of that delta in O((m+n) r^2).
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


class _AnyBase(Checkpoint):
    """Stand-in base for reading an adapter alone: every name resolves to itself, shapes from B @ A."""

    def __init__(self, adapter_path: str | Path):
        super().__init__(None, {}, {})
        folder = Path(adapter_path).expanduser()
        if not is_adapter(folder):
            raise MergelabError(f"{folder}: not a PEFT adapter folder (needs {CONFIG} and adapter_model.safetensors)")
        weight_file = next(folder / w for w in WEIGHT_FILES if (folder / w).is_file())
        fan_in_fan_out = bool(read_adapter_config(folder).get("fan_in_fan_out", False))
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
