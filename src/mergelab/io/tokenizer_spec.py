"""A recipe's ``tokenizer`` section / ``tokenizer_source`` as read and checked (no torch: recipes load
without it); ``vocab`` builds the output tokenizer and the aligned embeddings from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from mergelab.errors import MergelabError

TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}


@dataclass(frozen=True)
class TokenRule:
    """Where a token's row comes from when a model lacks it (or always, with ``force``)."""
    kind: str = "model"                 # model | model_token | zero
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass
class TokenizerSpec:
    source: str                          # "union", "base", or a model folder
    tokens: dict[str, TokenRule] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


def parse_tokenizer_spec(section: Any, tokenizer_source: Any, where: str, resolve) -> TokenizerSpec | None:
    """The recipe's ``tokenizer`` section or ``tokenizer_source`` (not both); ``resolve`` turns a model
    reference into a path (and checks that it exists)."""
    if section is None and tokenizer_source is None:
        return None
    if section is not None and tokenizer_source is not None:
        raise MergelabError(f"{where}: give either 'tokenizer_source' or a 'tokenizer' section, not both")
    label = "tokenizer_source" if section is None else "tokenizer source"
    if section is None:
        section = {"source": tokenizer_source}
    if not isinstance(section, Mapping):
        raise MergelabError(f"{where}: 'tokenizer' must be a mapping with source, tokens, pad_to_multiple_of")
    unknown = sorted(set(section) - TOKENIZER_KEYS)
    if unknown:
        raise MergelabError(f"{where}: tokenizer: unknown key {unknown[0]!r} (keys: {', '.join(sorted(TOKENIZER_KEYS))})")
    source = section.get("source", "union")
    if not isinstance(source, str) or not source:
        raise MergelabError(f"{where}: tokenizer source must be 'union', 'base' or a model path, got {source!r}")
    if source not in ("union", "base"):
        source = resolve(source, f"{where}: {label}")
    pad = section.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise MergelabError(f"{where}: tokenizer.pad_to_multiple_of must be a positive integer, got {pad!r}")
    tokens_raw = section.get("tokens") or {}
    if not isinstance(tokens_raw, Mapping):
        raise MergelabError(f"{where}: tokenizer.tokens must map tokens to {{source: ..., force: ...}}")
    tokens = {}
    for tok, cfg in tokens_raw.items():
        here = f"{where}: tokenizer.tokens[{tok!r}]"
        cfg = cfg or {}
        if not isinstance(cfg, Mapping) or set(cfg) - {"source", "force"}:
            raise MergelabError(f"{here}: must be a mapping with 'source' and/or 'force'")
        force = cfg.get("force", False)
        if not isinstance(force, bool):
            raise MergelabError(f"{here}: force must be true or false")
        src = cfg.get("source")
        if src is None:
            tokens[str(tok)] = TokenRule(force=force)
        elif isinstance(src, str):
            tokens[str(tok)] = TokenRule("model", resolve(src, f"{here}.source"), force=force)
        elif isinstance(src, Mapping) and src.get("kind") == "zero" and set(src) == {"kind"}:
            tokens[str(tok)] = TokenRule("zero", force=force)
        elif isinstance(src, Mapping) and src.get("kind") == "model_token":
            if set(src) - {"kind", "model", "token", "token_id"} or "model" not in src \
                    or (("token" in src) == ("token_id" in src)):
                raise MergelabError(f"{here}.source: model_token needs 'model' and exactly one of token, token_id")
            tid = src.get("token_id")
            if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int) or tid < 0):
                raise MergelabError(f"{here}.source: token_id must be a non-negative integer")
            tokens[str(tok)] = TokenRule("model_token", resolve(src["model"], f"{here}.source.model"),
                                         token=src.get("token"), token_id=tid, force=force)
        else:
            raise MergelabError(f"{here}.source: must be a model path, {{kind: zero}} or {{kind: model_token, ...}}")
    return TokenizerSpec(source, tokens, pad)
