"""Mixture-of-experts models built from dense fine-tunes, as ``mergekit-moe`` 0.1.5 builds them.

Every expert is a whole dense fine-tune of one base; each decoder layer's MLP of each expert becomes
one expert of that layer, attention, norms and embeddings come from the base, and the router of layer
``i`` is ``gate_vecs[i]`` (ALGORITHMS-2 13.13):

- ``hidden`` / ``hidden_last`` (default): the base's hidden state at the last position of each
  prompt (prompts left-padded with BOS, so that position is a real token) at the input of every layer,
  averaged over the expert's positive prompts, minus the same for its negative prompts, L2-normalised
  per layer; ``hidden_avg`` averages over the positions instead (pad positions included, as mergekit);
  the base runs in bfloat16, as mergekit runs it.
- ``cheap_embed``: the token embeddings of the prompts summed over (unpadded) positions and prompts,
  normalised, the same vector for every layer.
- ``random``: standard normal (not normalised); ``uniform_random``: U(-1/sqrt(h), 1/sqrt(h)).

Outputs: Mixtral (Llama/Mistral inputs, no shared experts; ``experts.{j}.w1/w2/w3``) and Qwen2-MoE
(exactly one shared expert with its own gate; Llama/Mistral/Qwen2 inputs). Per expert,
``noise_scale`` adds Gaussian noise to its MLP weights and ``residual_scale`` scales its
``down_proj``. SMILE (``upscale/smile.py``) is the data-free, zero-shot alternative: it needs no
prompts and no full copies of the fine-tunes, but works on deltas of one base only.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import yaml

from mergelab.errors import MergelabError
from mergelab.io import (USER_DTYPES, Checkpoint, ShardedWriter, atomic_output_dir, open_checkpoint, parse_size)
from mergelab.io.model_card import write_model_card
from mergelab.io.output import TOKENIZER_FILES

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
CONFIG_KEYS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture"}
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}
ARCHITECTURES = ("mixtral", "qwen")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")

Progress = Callable[[str, int, int], None]


@dataclass
class Expert:
    source_model: str
    positive_prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclass
class MoeConfig:
    base_model: str
    experts: list[Expert]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] = field(default_factory=list)
    architecture: str | None = None
    source: str = ""            # the YAML text, kept with the output

    def all_experts(self) -> list[Expert]:
        return self.experts + self.shared_experts


@dataclass
class MoeSummary:
    architecture: str
    experts: int
    shared_experts: int
    experts_per_token: int
    gate_mode: str
    layers: int
    parameters: int
    out_dir: Path
    seconds: float
    degenerate_layers: list[int]


# ---------------------------------------------------------------- config

def _closest(key: str, known: set[str]) -> str:
    import difflib
    match = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _expert(raw: Any, where: str, relative_to: Path | None) -> Expert:
    if not isinstance(raw, Mapping):
        raise MergelabError(f"{where}: must be a mapping with 'source_model', got {type(raw).__name__}")
    for key in raw:
        if key not in EXPERT_KEYS:
            raise MergelabError(f"{where}: unknown key {key!r}{_closest(str(key), EXPERT_KEYS)}")
    if "source_model" not in raw:
        raise MergelabError(f"{where}: 'source_model' is missing")
    prompts = {}
    for key in ("positive_prompts", "negative_prompts"):
        value = raw.get(key) or []
        if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise MergelabError(f"{where}.{key}: must be a list of strings")
        prompts[key] = list(value)
    scales = {}
    for key in ("noise_scale", "residual_scale"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise MergelabError(f"{where}.{key}: must be a finite number, got {value!r}")
        scales[key] = None if value is None else float(value)
    return Expert(_path(raw["source_model"], f"{where}.source_model", relative_to), **prompts, **scales)


def _path(value: Any, where: str, relative_to: Path | None) -> str:
    if not isinstance(value, str) or not value:
        raise MergelabError(f"{where}: must be a path to a model folder, got {value!r}")
    if "+" in value and not Path(value).exists():
        raise MergelabError(f"{where}: 'model+lora' references are not supported for MoE experts ({value!r})")
    p = Path(value).expanduser()
    if not p.is_absolute() and relative_to is not None and (relative_to / p).exists():
        p = relative_to / p
    if not p.is_dir():
        raise MergelabError(f"{where}: {value!r} is not a model folder (nothing is downloaded)")
    return str(p)


def load_moe_config(source: str | Path | Mapping[str, Any], *, allow_all_same: bool = False) -> MoeConfig:
    """Parse and check a mergekit-moe config before any tensor is read."""
    text = ""
    relative_to = None
    if isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = Path(source).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MergelabError(f"{path}: cannot read the MoE config ({e})") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise MergelabError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
        relative_to = path.parent
        if not isinstance(raw, Mapping):
            raise MergelabError(f"{path}: a MoE config must be a mapping with base_model and experts")
    where = "moe config"
    for key in raw:
        if key not in CONFIG_KEYS:
            raise MergelabError(f"{where}: unknown key {key!r}{_closest(str(key), CONFIG_KEYS)}")
    if "base_model" not in raw or "experts" not in raw:
        raise MergelabError(f"{where}: 'base_model' and 'experts' are required")
    if not isinstance(raw["experts"], list) or not raw["experts"]:
        raise MergelabError(f"{where}: 'experts' must be a non-empty list")
    shared_raw = raw.get("shared_experts") or []
    if not isinstance(shared_raw, list):
        raise MergelabError(f"{where}: 'shared_experts' must be a list")
    gate_mode = raw.get("gate_mode", "hidden")
    if gate_mode not in GATE_MODES:
        raise MergelabError(f"{where}: gate_mode must be one of {', '.join(GATE_MODES)}, got {gate_mode!r}")
    per_token = raw.get("experts_per_token", 2)
    if isinstance(per_token, bool) or not isinstance(per_token, int) or per_token < 1:
        raise MergelabError(f"{where}: experts_per_token must be an integer >= 1, got {per_token!r}")
    dtype = raw.get("dtype")
    if dtype is not None and dtype not in USER_DTYPES:
        raise MergelabError(f"{where}: dtype must be one of {', '.join(sorted(USER_DTYPES))}, got {dtype!r}")
    arch = raw.get("architecture")
    if arch is not None and (not isinstance(arch, str)
                             or not any(a.startswith(arch.lower()) for a in ARCHITECTURES)):
        raise MergelabError(f"{where}: architecture {arch!r} is not supported (supported: Mixtral, Qwen MoE)")
    config = MoeConfig(
        base_model=_path(raw["base_model"], f"{where}: base_model", relative_to),
        experts=[_expert(e, f"{where}: experts[{i}]", relative_to) for i, e in enumerate(raw["experts"])],
        shared_experts=[_expert(e, f"{where}: shared_experts[{i}]", relative_to) for i, e in enumerate(shared_raw)],
        gate_mode=gate_mode, dtype=dtype, experts_per_token=per_token, architecture=arch, source=text)
    _check_sense(config, allow_all_same)
    return config


def _check_sense(config: MoeConfig, allow_all_same: bool) -> None:
    """mergekit's ``is_bad_config``: refusals that would otherwise give a useless model."""
    if len(config.experts) < config.experts_per_token:
        raise MergelabError(f"moe config: experts_per_token ({config.experts_per_token}) exceeds the number of "
                            f"experts ({len(config.experts)})")
    if config.gate_mode not in ("random", "uniform_random"):
        for i, e in enumerate(config.experts):
            if not e.positive_prompts:
                raise MergelabError(f"moe config: experts[{i}] has no positive_prompts (needed by gate_mode "
                                    f"{config.gate_mode!r})")
        first = (config.experts[0].positive_prompts, config.experts[0].negative_prompts)
        if len(config.experts) > 1 and all((e.positive_prompts, e.negative_prompts) == first
                                           for e in config.experts[1:]):
            raise MergelabError("moe config: every expert has the same prompts: the router could not tell them "
                                "apart")
        with_prompts = [bool(e.positive_prompts) for e in config.shared_experts]
        if with_prompts and any(with_prompts) != all(with_prompts):
            raise MergelabError("moe config: give prompts for all shared experts or for none")
    if not allow_all_same and len(config.experts) > 1:
        first = Path(config.experts[0].source_model).resolve()
        if all(Path(e.source_model).resolve() == first for e in config.experts[1:]):
            raise MergelabError("moe config: every expert is the same model: the MoE would compute the same "
                                "function at a higher cost (pass --allow-all-same to build it anyway)")


# ---------------------------------------------------------------- architecture

def _model_config(folder: str) -> dict:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MergelabError(f"{path}: missing (a MoE is built from Hugging Face model folders)") from None
    except ValueError as e:
        raise MergelabError(f"{path}: invalid JSON ({e})") from None


def select_architecture(config: MoeConfig) -> str:
    """The output architecture mergekit would choose: Mixtral where it can, else Qwen MoE."""
    types = {_model_config(m).get("model_type") for m in [config.base_model]
             + [e.source_model for e in config.all_experts()]}
    reasons = {}
    if len(types) != 1:
        reasons["mixtral"] = reasons["qwen"] = f"the models have different architectures ({sorted(map(str, types))})"
    else:
        (kind,) = types
        if config.shared_experts:
            reasons["mixtral"] = "Mixtral has no shared experts"
        elif kind not in ("llama", "mistral"):
            reasons["mixtral"] = f"Mixtral needs Llama or Mistral models, got {kind!r}"
        if len(config.shared_experts) != 1:
            reasons["qwen"] = "Qwen MoE needs exactly one shared expert"
        elif kind not in ("llama", "mistral", "qwen2"):
            reasons["qwen"] = f"Qwen MoE needs Qwen2, Llama or Mistral models, got {kind!r}"
        elif config.gate_mode not in ("random", "uniform_random") and not config.shared_experts[0].positive_prompts:
            reasons["qwen"] = "Qwen MoE needs prompts for the shared expert"
    candidates = [a for a in ARCHITECTURES if config.architecture is None or a.startswith(config.architecture.lower())]
    for arch in candidates:
        if arch not in reasons:
            return arch
    why = "; ".join(f"{a}: {reasons[a]}" for a in candidates)
    raise MergelabError(f"moe config: no output architecture fits ({why})")


def _output_config(folder: str, arch: str, experts: int, per_token: int, dtype: torch.dtype | None):
    """The output's transformers config, built as mergekit 0.1.5 builds it from the base's."""
    import transformers
    base = transformers.AutoConfig.from_pretrained(folder)
    if arch == "mixtral":
        if not isinstance(base, transformers.MistralConfig):
            mistral = transformers.MistralConfig(**base.to_dict())
            mistral.sliding_window = None
            mistral.max_position_embeddings = base.max_position_embeddings
            base = mistral
        out = transformers.MixtralConfig(**base.to_dict())
        out.architectures = ["MixtralForCausalLM"]
        out.num_local_experts = experts
    else:
        out = transformers.Qwen2MoeConfig(**base.to_dict())
        out.architectures = ["Qwen2MoeForCausalLM"]
        out.num_experts = experts
        out.decoder_sparse_step = 1
        out.norm_topk_prob = True
        out.use_sliding_window = False
        out.shared_expert_intermediate_size = out.intermediate_size
        out.moe_intermediate_size = out.intermediate_size
    out.num_experts_per_tok = per_token
    out.sliding_window = None
    if dtype is not None:
        out.dtype = dtype          # transformers 5 (torch_dtype is its deprecated alias)
    return out


def _output_dtype(config: MoeConfig, base: dict) -> torch.dtype | None:
    """mergekit's ``select_dtype``: the config's dtype, else the base config's."""
    name = config.dtype or base.get("torch_dtype") or base.get("dtype")
    return USER_DTYPES.get(name) if isinstance(name, str) else None


# ---------------------------------------------------------------- gates

def _tokenizer(folder: str):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise MergelabError(f"{folder}: cannot load the base's tokenizer for the prompts ({str(e).splitlines()[0]})")
    tok.padding_side = "left"          # the last position of every prompt is a real token
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.pad_token_id is None:
        raise MergelabError(f"{folder}: the tokenizer has neither a BOS nor an EOS token to pad prompts with")
    return tok


def _tokenize(tok, prompts: list[str]) -> dict[str, torch.Tensor]:
    return dict(tok([(tok.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                    add_special_tokens=False))


def gate_vectors(config: MoeConfig, *, device: str = "cpu", seed: int = 0,
                 progress: Progress | None = None) -> torch.Tensor:
    """``[layers, experts (+ shared with prompts), hidden]`` router rows, as mergekit computes them."""
    base_cfg = _model_config(config.base_model)
    layers, hidden = int(base_cfg["num_hidden_layers"]), int(base_cfg["hidden_size"])
    need = list(config.experts)
    if config.shared_experts and config.shared_experts[0].positive_prompts:
        need += config.shared_experts
    if config.gate_mode == "random":
        return torch.randn((layers, len(need), hidden), generator=torch.Generator().manual_seed(seed))
    if config.gate_mode == "uniform_random":
        bound = 1 / math.sqrt(hidden)
        g = torch.Generator().manual_seed(seed)
        return torch.rand((layers, len(need), hidden), generator=g).mul_(2 * bound).sub_(bound)
    tok = _tokenizer(config.base_model)
    if config.gate_mode == "cheap_embed":
        with open_checkpoint(config.base_model) as base:
            name = "model.embed_tokens.weight"
            if name not in base:
                raise MergelabError(f"{config.base_model}: no tensor {name!r} for gate_mode cheap_embed")
            embed = base.get(name).float()

        def statistic(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            ids = batch["input_ids"]
            if int(ids.max()) >= embed.shape[0]:
                raise MergelabError(f"{config.base_model}: the tokenizer yields ids beyond the embedding's "
                                    f"{embed.shape[0]} rows")
            h = embed[ids] * batch["attention_mask"].unsqueeze(-1)      # == one-hot @ E, without the one-hot
            v = h.sum(dim=1).sum(dim=0, keepdim=True)                   # mergekit's order of the sums
            return (v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(layers, 1)
    else:
        from transformers import AutoModelForCausalLM
        try:
            model = AutoModelForCausalLM.from_pretrained(config.base_model, dtype=torch.bfloat16).to(device).eval()
        except (OSError, ValueError) as e:
            raise MergelabError(f"{config.base_model}: cannot load the base model ({str(e).splitlines()[0]})")
        average = config.gate_mode == "hidden_avg"

        def statistic(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            with torch.no_grad():
                out = model(**{k: v.to(device) for k, v in batch.items()}, output_hidden_states=True,
                            return_dict=True)
            hs = torch.stack(out.hidden_states[:-1])           # the input of every layer
            hs = hs.sum(dim=2) / hs.shape[2] if average else hs[:, :, -1, :]
            return (hs.sum(dim=1) / hs.shape[1]).cpu()   # bfloat16 throughout, as mergekit computes it

    rows = []
    for i, expert in enumerate(need):
        v = statistic(_tokenize(tok, expert.positive_prompts))
        if expert.negative_prompts:
            v = v - statistic(_tokenize(tok, expert.negative_prompts))
        rows.append(v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
        if progress:
            progress("gate prompts", i + 1, len(need))
    gates = torch.stack(rows, dim=1).float()
    if not bool(torch.isfinite(gates).all()):
        raise MergelabError(f"{config.base_model}: the prompts' hidden states are not finite (NaN/Inf in the base?)")
    return gates


def degenerate_layers(gates: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose router rows are nearly dependent (condition number > 5, mergekit's warning)."""
    return [i for i in range(gates.shape[0]) if float(torch.linalg.cond(gates[i].float())) > threshold]


# ---------------------------------------------------------------- writing

def _expert_tensor(ckpt: Checkpoint, name: str, expert: Expert, generator: torch.Generator) -> torch.Tensor:
    if name not in ckpt:
        raise MergelabError(f"{ckpt.path}: no tensor {name!r} (the expert must have the base's architecture)")
    t = ckpt.get(name)
    if expert.noise_scale is not None:
        t = t + torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.dtype) * expert.noise_scale
    if expert.residual_scale is not None and ".down_proj." in name:
        t = t * expert.residual_scale
    return t


def _plan(arch: str, base: Checkpoint, n_experts: int, layers: int
          ) -> list[tuple[str, str, int | None, str | None]]:
    """(output name, source name, expert index or None for the base, special) for every output tensor.

    Mixtral is written in transformers' own layout, as mergekit 0.1.5 writes it: per layer
    ``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` (each expert's gate_proj rows, then its up_proj rows) and
    ``mlp.experts.down_proj`` ``[E, H, I]``; Qwen2-MoE per expert (``mlp.experts.{j}.*``) plus the shared one.
    """
    plan = []
    for name in base.keys():
        if ".mlp." not in name:
            plan.append((name, name, None, None))
            continue
        if arch == "mixtral":
            prefix = name.split(".mlp.")[0]
            if name.endswith(".mlp.gate_proj.weight"):
                plan.append((f"{prefix}.mlp.experts.gate_up_proj", name, None, "gate_up"))
            elif name.endswith(".mlp.down_proj.weight"):
                plan.append((f"{prefix}.mlp.experts.down_proj", name, None, "down"))
            elif not name.endswith(".mlp.up_proj.weight"):
                raise MergelabError(f"{base.path}: tensor {name!r} has no place in a Mixtral expert")
            continue
        for j in range(n_experts):
            plan.append((name.replace(".mlp.", f".mlp.experts.{j}."), name, j, None))
        plan.append((name.replace(".mlp.", ".mlp.shared_expert."), name, n_experts, None))
    if arch == "qwen":   # Qwen2-MoE has q/k/v biases: zeros where the inputs have none
        present = set(base.keys())
        for i in range(layers):
            for proj in ("q_proj", "k_proj", "v_proj"):
                name = f"model.layers.{i}.self_attn.{proj}.bias"
                if name not in present:
                    plan.append((name, name, None, "zero_bias"))
    for i in range(layers):
        plan.append((f"model.layers.{i}.mlp.gate.weight", "", None, "gate"))
        if arch == "qwen":
            plan.append((f"model.layers.{i}.mlp.shared_expert_gate.weight", "", None, "shared_gate"))
    return plan


def build_moe(config: MoeConfig | str | Path | Mapping[str, Any], out_dir: str | Path, *, force: bool = False,
              device: str = "cpu", seed: int = 0, shard_size: str | int = "5GB", allow_all_same: bool = False,
              progress: Progress | None = None) -> MoeSummary:
    """Build the MoE model into ``out_dir`` (written beside it and renamed when complete)."""
    started = time.perf_counter()
    if not isinstance(config, MoeConfig):
        config = load_moe_config(config, allow_all_same=allow_all_same)
    arch = select_architecture(config)
    base_cfg = _model_config(config.base_model)
    layers, hidden = int(base_cfg["num_hidden_layers"]), int(base_cfg["hidden_size"])
    out_dtype = _output_dtype(config, base_cfg)
    n = len(config.experts)
    checkpoints = [open_checkpoint(config.base_model)]
    try:
        checkpoints += [open_checkpoint(e.source_model) for e in config.all_experts()]
        base = checkpoints[0]
        for e, ck in zip(config.all_experts(), checkpoints[1:]):
            for name in base.keys():
                if ".mlp." in name and (name not in ck or tuple(ck.shape(name)) != tuple(base.shape(name))):
                    raise MergelabError(f"{e.source_model}: tensor {name!r} is missing or has another shape than "
                                        "in the base")
        gates = gate_vectors(config, device=device, seed=seed, progress=progress)
        router, shared_router = gates[:, :n], gates[:, n:]
        if arch == "qwen" and shared_router.shape[1] == 0:      # random gates give the shared expert one row too
            shared_router = torch.randn((layers, 1, hidden), generator=torch.Generator().manual_seed(seed + 1))
        out_cfg = _output_config(config.base_model, arch, n, config.experts_per_token, out_dtype)
        plan = _plan(arch, base, n, layers)
        head_dim = getattr(out_cfg, "head_dim", None) or hidden // out_cfg.num_attention_heads

        def dtype_of(source: str, special: str | None) -> torch.dtype:
            if out_dtype is not None:
                return out_dtype
            return base.dtype(source) if source else base.dtype("model.embed_tokens.weight")

        def shape_of(out: str, source: str, special: str | None) -> tuple[int, ...]:
            if special == "gate":
                return (n, hidden)
            if special == "shared_gate":
                return (1, hidden)
            if special in ("gate_up", "down"):
                rows, cols = base.shape(source)
                return (n, 2 * rows, cols) if special == "gate_up" else (n, rows, cols)
            if special == "zero_bias":
                heads = out_cfg.num_key_value_heads if ("k_proj" in out or "v_proj" in out) else \
                    out_cfg.num_attention_heads
                return (int(heads) * head_dim,)
            return tuple(base.shape(source))

        layout = [(out, dtype_of(src, sp), shape_of(out, src, sp)) for out, src, _, sp in plan]
        generators = [torch.Generator().manual_seed(seed * 1009 + j + 1) for j in range(len(checkpoints))]
        with atomic_output_dir(out_dir, force=force) as tmp:
            writer = ShardedWriter(tmp, layout, parse_size(shard_size), metadata={"format": "pt"})
            try:
                for done, ((out, src, j, special), (_, dtype, _shape)) in enumerate(zip(plan, layout)):
                    if special == "gate":
                        t = router[int(_LAYER.match(out).group(1))]
                    elif special == "shared_gate":
                        t = shared_router[int(_LAYER.match(out).group(1))]
                    elif special == "zero_bias":
                        t = torch.zeros(_shape)
                    elif special in ("gate_up", "down"):
                        parts = [src] if special == "down" else [src, src.replace(".gate_proj.", ".up_proj.")]
                        t = torch.stack([torch.cat([_expert_tensor(checkpoints[k + 1], s, config.experts[k],
                                                                   generators[k + 1]) for s in parts])
                                         for k in range(n)])
                    elif j is None:
                        t = base.get(src)
                    else:
                        t = _expert_tensor(checkpoints[j + 1], src, config.all_experts()[j], generators[j + 1])
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        where = config.base_model if j is None else config.all_experts()[j].source_model
                        raise MergelabError(f"{where}: tensor {src or out!r} contains NaN or Inf")
                    writer.write(out, t.to(dtype).contiguous())
                    if progress:
                        progress("tensors", done + 1, len(plan))
            except BaseException:
                writer.abort()
                raise
            writer.close()
            out_cfg.save_pretrained(tmp)
            for name in TOKENIZER_FILES:
                if (Path(config.base_model) / name).is_file():
                    (tmp / name).write_bytes((Path(config.base_model) / name).read_bytes())
            if config.source:
                (tmp / "mergekit_moe_config.yml").write_text(config.source)
            card_recipe = yaml.safe_load(config.source) if config.source else None
            write_model_card(tmp, method=f"mergekit-moe ({config.gate_mode} gates)", base_model=config.base_model,
                             models=[e.source_model for e in config.all_experts()], recipe=card_recipe,
                             kind="mixture of experts", tags=["moe"])
        parameters = sum(math.prod(shape) for _, _, shape in layout)
    finally:
        for ck in checkpoints:
            ck.close()
    return MoeSummary(architecture={"mixtral": "Mixtral", "qwen": "Qwen2-MoE"}[arch], experts=n,
                      shared_experts=len(config.shared_experts), experts_per_token=config.experts_per_token,
                      gate_mode=config.gate_mode, layers=layers, parameters=parameters,
                      out_dir=Path(out_dir).expanduser().resolve(), seconds=time.perf_counter() - started,
                      degenerate_layers=degenerate_layers(gates))
