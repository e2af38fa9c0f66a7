"""Tokenizer union and vocabulary-aligned embeddings, with mergekit 0.1.5's semantics (ALGORITHMS-2 13.12).

A recipe with ``tokenizer_source: union|base|<model>`` or a ``tokenizer:`` section gets an output
tokenizer first (the base's, a model's, or the union of every input's vocabulary and added tokens,
plus ``tokenizer.tokens``), then every vocabulary-indexed tensor (token embeddings, LM head) of every
input is re-indexed to the output vocabulary before the merge method sees it: a model's own row where
it has the token, else the fill rule (the only model having it; the base's row when the base has it;
the mean of the models having it; zeros; or an explicit ``source`` / ``force``), padding rows up to
``pad_to_multiple_of`` the mean of that model's rows. ``AlignedCheckpoint`` presents the re-indexed
tensors, so the engine merges them like any other tensor.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from mergelab.errors import MergelabError
from mergelab.io.checkpoint import Checkpoint, TensorInfo
from mergelab.io.output import TOKENIZER_FILES
from mergelab.io.tokenizer_spec import TOKENIZER_KEYS, TokenizerSpec, TokenRule, parse_tokenizer_spec  # noqa: F401

VOCAB_TENSOR = re.compile(r"(^|\.)(embed_tokens|lm_head|wte|word_embeddings|embed_in|embed_out)\.weight$")
# ---------------------------------------------------------------- tokenizers

def _vocab_size(folder: str) -> int | None:
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("vocab_size") if isinstance(config, dict) else None
    if value is None and isinstance(config, dict):
        value = (config.get("text_config") or {}).get("vocab_size")
    return int(value) if isinstance(value, int) else None


def _load_tokenizer(folder: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(folder, use_fast=True)
    except (OSError, ValueError, TypeError) as e:
        raise MergelabError(f"{folder}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None


def _stripped(folder: str):
    """The base's tokenizer without tokens whose ids the model has no rows for (mergekit's stripping)."""
    tok = _load_tokenizer(folder)
    size = _vocab_size(folder) or len(tok.get_vocab())
    unused = [t for t, i in tok.get_vocab().items() if i >= size]
    if not unused:
        return tok
    if not tok.is_fast:
        raise MergelabError(f"{folder}: the tokenizer has tokens beyond the model's vocab_size and no fast version")
    data = json.loads(tok._tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise MergelabError(f"{folder}: the tokenizer has tokens beyond vocab_size; only BPE ones can be stripped")
    drop = set(unused)
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < size]
    for t in unused:
        data["model"]["vocab"].pop(t, None)
    data["model"]["merges"] = [m for m in data["model"]["merges"]
                               if not drop & set(m.split(" ") if isinstance(m, str) else m)]
    import tokenizers
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tok


def _union(base_tok, toks: Mapping[str, Any]):
    """The base's tokenizer plus every other token of the inputs, appended in discovery order."""
    import tempfile

    from transformers import AutoTokenizer
    vocab: dict[str, int] = {}
    added: dict[str, Any] = {}
    for folder, tok in toks.items():
        size = _vocab_size(folder) or tok.vocab_size
        own_added = tok.added_tokens_decoder
        added_names = {info.content for info in own_added.values()}
        for t, i in tok.get_vocab().items():
            if i < size and t not in added_names and t not in vocab:
                vocab[t] = len(vocab)
        for i, info in own_added.items():
            if i < size and info.content not in added:
                added[info.content] = info
    with tempfile.TemporaryDirectory() as tmp:
        base_tok.save_pretrained(tmp)
        out = AutoTokenizer.from_pretrained(tmp, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for t in vocab:
        if t not in added and t not in base_vocab:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


@dataclass
class VocabPlan:
    tokenizer: Any
    vocab: dict[str, int]                       # output token -> id
    size: int                                   # output rows (padded)
    permutations: dict[str, dict[int, int]]     # model folder -> {new id: old id, -1 absent}
    original: dict[str, dict[str, int]]         # model folder -> its own vocab
    rules: dict[str, TokenRule]
    base: str | None
    models: list[str]                           # every input, base first when there is one
    identity: bool = False                      # every input already has the output vocabulary, in order


def plan_vocabulary(spec: TokenizerSpec, base: str | None, models: Sequence[str]) -> VocabPlan:
    """Output tokenizer and each input's permutation into it."""
    ref = base or models[0]
    everyone = [ref] + [m for m in models if m != ref]
    base_tok = _stripped(ref)
    toks = {ref: base_tok}
    for m in everyone[1:]:   # a model folder without tokenizer files shares the base's (as mergekit assumes)
        has_files = any((Path(m) / f).is_file() for f in TOKENIZER_FILES)
        toks[m] = _load_tokenizer(m) if has_files else base_tok
    if spec.source == "union":
        out = _union(base_tok, toks)
    elif spec.source == "base":
        out = base_tok
    else:
        out = _load_tokenizer(spec.source)
    existing = set(out.get_vocab())
    for t in spec.tokens:
        if t not in existing:
            out.add_tokens(t)
            existing.add(t)
    vocab = out.get_vocab()
    size = len(vocab)
    if spec.pad_to_multiple_of and size % spec.pad_to_multiple_of:
        size = (size // spec.pad_to_multiple_of + 1) * spec.pad_to_multiple_of
    permutations, original = {}, {}
    for m in everyone:
        own = toks[m].get_vocab()
        rows = _vocab_size(m) or len(own)
        p = {}
        for t, new in vocab.items():
            old = own.get(t, -1)
            if old < rows:
                p[new] = old
        permutations[m], original[m] = p, own
    for t, rule in spec.tokens.items():
        if rule.kind == "model_token" and rule.token is not None and rule.token not in original.get(rule.model, {}):
            raise MergelabError(f"tokenizer.tokens[{t!r}]: token {rule.token!r} is not in {rule.model}'s vocabulary")
        if rule.model is not None and rule.model not in permutations:
            raise MergelabError(f"tokenizer.tokens[{t!r}]: {rule.model} is not one of the recipe's models")
    identity = size == len(vocab) and not spec.tokens and all(
        (_vocab_size(m) or len(original[m])) == size and all(p.get(i) == i for i in range(size))
        for m, p in permutations.items())
    return VocabPlan(out, vocab, size, permutations, original, dict(spec.tokens), base, everyone, identity)


def align_rows(plan: VocabPlan, tensors: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Every model's tensor re-indexed to the output vocabulary (rows along dim 0), mergekit's fill rules."""
    models = [m for m in plan.models if m in tensors]
    dtype = tensors[models[0]].dtype
    for t in tensors.values():
        dtype = torch.promote_types(dtype, t.dtype)
    shape = tensors[models[0]].shape[1:]
    perms = {m: plan.permutations[m] for m in models}
    fills: dict[int, torch.Tensor] = {}
    for tok, tid in plan.vocab.items():
        rule = plan.rules.get(tok)
        present = [m for m in models if perms[m].get(tid, -1) >= 0]
        if not (rule and rule.force) and len(present) == len(models):
            continue
        if rule is not None and rule.kind == "zero":
            fill = torch.zeros(shape, dtype=dtype)
        elif rule is not None and rule.model is not None:
            if rule.model not in tensors:
                raise MergelabError(f"{where}: token {tok!r} needs a row of {rule.model}, which has no such tensor")
            src = tensors[rule.model]
            if rule.kind == "model_token":
                old = rule.token_id if rule.token_id is not None else plan.original[rule.model][rule.token]
            else:
                old = perms[rule.model].get(tid, -1)
                if old < 0:
                    raise MergelabError(f"{where}: token {tok!r} is not in {rule.model}, the source given for it")
            if not 0 <= old < src.shape[0]:
                raise MergelabError(f"{where}: token id {old} is out of range for {rule.model}")
            fill = src[old].to(dtype)
        elif len(present) == 1:
            fill = tensors[present[0]][perms[present[0]][tid]].to(dtype)
        elif not present:
            fill = torch.zeros(shape, dtype=dtype)
        elif plan.base in models and perms[plan.base].get(tid, -1) >= 0:
            fill = tensors[plan.base][perms[plan.base][tid]].to(dtype)
        else:
            fill = sum(tensors[m][perms[m][tid]].to(dtype) for m in present) / len(present)
        fills[tid] = fill
    out = {}
    n = len(plan.vocab)
    forced = torch.tensor(sorted(plan.vocab[tok] for tok, r in plan.rules.items() if r.force and tok in plan.vocab),
                          dtype=torch.long)
    for m in models:
        index = torch.full((n,), -1, dtype=torch.long)
        for new_id, old_id in perms[m].items():
            index[new_id] = old_id
        if forced.numel():
            index[forced] = -1
        new = torch.zeros((plan.size, *shape), dtype=dtype)
        have = index >= 0
        new[:n][have] = tensors[m][index[have]].to(dtype)      # own rows, gathered at once
        for tid, fill in fills.items():
            if not bool(have[tid]):
                new[tid] = fill
        if plan.size > n:
            new[n:] = new[:n].mean(dim=0)
        out[m] = new
    return out


class _AlignedTensors:
    """Re-indexed vocabulary tensors of all inputs, computed once per name and shared by the wrappers."""

    def __init__(self, plan: VocabPlan, inner: Mapping[str, Checkpoint]):
        self.plan, self.inner = plan, inner
        self.lock = threading.Lock()
        self.cache: dict[str, dict[str, torch.Tensor]] = {}
        self.readers: dict[str, set[str]] = {}

    def get(self, name: str, model: str) -> torch.Tensor:
        with self.lock:
            if name not in self.cache:
                present = {m: c.get(name) for m, c in self.inner.items() if name in c}
                self.cache[name] = align_rows(self.plan, present, name)
                self.readers[name] = set(self.cache[name])
            return self.cache[name][model]

    def done(self, name: str, model: str) -> None:
        """Drop a name's tensors once every model has read its whole tensor."""
        with self.lock:
            readers = self.readers.get(name)
            if readers is not None:
                readers.discard(model)
                if not readers:
                    self.cache.pop(name, None)
                    self.readers.pop(name, None)


class AlignedCheckpoint(Checkpoint):
    """A checkpoint whose vocabulary tensors read re-indexed to the output tokenizer."""

    def __init__(self, inner: Checkpoint, key: str, shared: _AlignedTensors, vocab_names: set[str]):
        super().__init__(inner.path, {}, {})
        self.inner, self.key, self.shared, self.vocab_names = inner, key, shared, vocab_names

    def keys(self) -> list[str]:
        return self.inner.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.inner

    def info(self, name: str) -> TensorInfo:
        info = self.inner.info(name)
        if name in self.vocab_names:
            return TensorInfo(info.dtype, (self.shared.plan.size, *info.shape[1:]))
        return info

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if name not in self.vocab_names:
            return self.inner.get(name, rows)
        full = self.shared.get(name, self.key)
        if rows is None or rows[1] >= full.shape[0]:
            self.shared.done(name, self.key)
        part = full if rows is None else full[rows[0]:rows[1]]
        return part.to(self.inner.dtype(name)).clone()

    @property
    def fresh_tensors(self) -> bool:
        return self.inner.fresh_tensors

    def close(self) -> None:
        self.inner.close()


def vocabulary_tensors(ckpt: Checkpoint, folder: str | None) -> set[str]:
    """Names of the tensors indexed by token (rows = the model's vocab_size)."""
    size = _vocab_size(folder) if folder else None
    return {n for n in ckpt.keys() if VOCAB_TENSOR.search(n) and len(ckpt.shape(n)) >= 1
            and (size is None or ckpt.shape(n)[0] == size)}


def align_checkpoints(plan: VocabPlan, named: Mapping[str, Checkpoint]) -> dict[str, AlignedCheckpoint]:
    """Wrap every input so that its vocabulary tensors read in the output vocabulary."""
    shared = _AlignedTensors(plan, named)
    names = set()
    for folder, ckpt in named.items():
        names |= vocabulary_tensors(ckpt, folder)
    return {folder: AlignedCheckpoint(ckpt, folder, shared, names & set(ckpt.keys())) for folder, ckpt in named.items()}
