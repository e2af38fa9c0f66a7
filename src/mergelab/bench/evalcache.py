"""Content-addressed cache of evaluation outputs: a re-run of the benchmark with the same fine-tunes
skips the embedding pass of every model it has already scored, bit for bit.

An entry is the per-task logits of one encoder on one split through each task's head. Its key
hashes everything those logits depend on: the encoder's class, configuration and every tensor of
its state dict, the heads' weights, the token ids, the pad id, the embedding batch size, the torch
thread count and device, and the torch / transformers versions. Only encoders made of torch and
transformers modules are cached: a mergelab module (SMILE, WEMoE, ...) may compute its forward from
attributes the state dict does not hold, or from code that changed since the entry was written,
so those are always measured. Entries are safetensors files (nothing is unpickled), written to a
temporary name and renamed, so an interrupted run never leaves a torn entry.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

CACHE_VERSION = 1   # bump when the embedding (pooling, batching), ZeroShotHead or head application changes


def _hash_tensor(h, name: str, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def cacheable(module: nn.Module, stable: tuple[type, ...] = ()) -> bool:
    """True when every submodule is a torch or transformers class (forward fixed by the weights,
    the configuration and the installed versions) or one of the ``stable`` classes (whose forward is
    covered by CACHE_VERSION, e.g. the benchmark's zero-shot head)."""
    return all(type(m) in stable or type(m).__module__.split(".")[0] in ("torch", "transformers")
               for m in module.modules())


def module_fingerprint(module: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{type(module).__module__}.{type(module).__qualname__}|".encode())
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    for name, t in module.state_dict().items():
        _hash_tensor(h, name, t)
    return h.hexdigest()


def seqs_fingerprint(seqs: Sequence[Sequence[int]]) -> str:
    h = hashlib.blake2b(digest_size=20)
    for s in seqs:
        h.update(json.dumps(list(s), separators=(",", ":")).encode())
        h.update(b";")
    return h.hexdigest()


class EvalCache:
    """``folder/<key>.safetensors`` entries; ``hits`` / ``misses`` count this run's lookups."""

    def __init__(self, folder: str | os.PathLike, stable: tuple[type, ...] = ()):
        self.folder = Path(folder)
        self.stable = tuple(stable)
        self.hits = 0
        self.misses = 0
        self.skipped = 0   # lookups of modules that are not cacheable
        self._seqs: dict[int, tuple[Sequence, str]] = {}

    def _seqs_key(self, seqs: Sequence[Sequence[int]]) -> str:
        hit = self._seqs.get(id(seqs))
        if hit is not None and hit[0] is seqs:
            return hit[1]
        fp = seqs_fingerprint(seqs)
        self._seqs[id(seqs)] = (seqs, fp)
        return fp

    def key(self, encoder: nn.Module, parts: Sequence[tuple[str, Sequence[Sequence[int]], nn.Module]],
            extra: Mapping[str, object]) -> str:
        import transformers
        h = hashlib.blake2b(digest_size=20)
        h.update(json.dumps({"v": CACHE_VERSION, "torch": torch.__version__, "transformers": transformers.__version__,
                             "threads": torch.get_num_threads(), **extra}, sort_keys=True, default=str).encode())
        h.update(module_fingerprint(encoder).encode())
        for name, seqs, head in parts:
            h.update(f"|{name}|{self._seqs_key(seqs)}|".encode())
            for pname, t in head.state_dict().items():
                _hash_tensor(h, pname, t)
        return h.hexdigest()

    def logits(self, encoder: nn.Module, parts: Sequence[tuple[str, Sequence[Sequence[int]], nn.Module]],
               compute: Callable[[], dict[str, torch.Tensor]], extra: Mapping[str, object]) -> dict[str, torch.Tensor]:
        """``compute()`` (task -> logits) unless the same encoder, inputs and heads were scored before."""
        if not cacheable(encoder, self.stable) or not all(cacheable(head, self.stable) for _, _, head in parts):
            self.skipped += 1
            return compute()
        from safetensors.torch import load_file, save_file
        key = self.key(encoder, parts, extra)
        path = self.folder / f"{key}.safetensors"
        if path.is_file():
            try:
                got = load_file(str(path))
            except Exception:   # a damaged entry is measured again and rewritten
                got = None
            if got is not None and set(got) == {name for name, _, _ in parts}:
                self.hits += 1
                return got
        self.misses += 1
        out = compute()
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{key}.{os.getpid()}.tmp")
        save_file({k: v.detach().float().cpu().contiguous() for k, v in out.items()}, str(tmp))
        tmp.replace(path)
        return out

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "not_cacheable": self.skipped}
