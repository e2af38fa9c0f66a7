"""Text-encoder plumbing for the CLI and the benchmark: a mean-pooling wrapper around a Hugging
Face encoder, linear heads, unlabelled text loaders and the `--data` folder layout."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from mergelab.errors import MergelabError
from mergelab.io import check_finite

PREFIX = "encoder."


class PooledEncoder(nn.Module):
    """forward(input_ids, attention_mask) -> mean of the last hidden states over real tokens.

    Its state-dict names are the encoder's prefixed with "encoder." (see `prefixed`)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def prefixed(sd):
    return {PREFIX + k: v for k, v in sd.items()}


def unprefixed(sd):
    return {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


class ShuffledBatches:
    """Re-iterable loader over pre-tokenized sequences: a fresh seeded shuffle every pass."""

    def __init__(self, seqs: Sequence[Sequence[int]], batch_size: int = 16, seed: int = 0, pad_id: int = 0):
        if not seqs:
            raise MergelabError("no unlabelled inputs")
        self.seqs, self.batch_size, self.pad_id = list(seqs), batch_size, pad_id
        self.rng = random.Random(seed)

    def __iter__(self):
        order = list(range(len(self.seqs)))
        self.rng.shuffle(order)
        for i in range(0, len(order), self.batch_size):
            yield pad_batch([self.seqs[j] for j in order[i:i + self.batch_size]], self.pad_id)


class LabelledBatches:
    """Re-iterable (batch, labels) loader over token ids: a fresh seeded shuffle every pass."""

    def __init__(self, seqs: Sequence[Sequence[int]], labels: Sequence[int], batch_size: int = 32, seed: int = 0,
                 pad_id: int = 0):
        if not seqs:
            raise MergelabError("no labelled inputs")
        self.seqs, self.labels, self.batch_size, self.pad_id = list(seqs), list(labels), batch_size, pad_id
        self.rng = random.Random(seed)

    def __iter__(self):
        order = list(range(len(self.seqs)))
        self.rng.shuffle(order)
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            yield pad_batch([self.seqs[j] for j in idx], self.pad_id), torch.tensor([self.labels[j] for j in idx])


def linear_head(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight.float())
        if bias is not None:
            head.bias.copy_(bias.float())
    head.requires_grad_(False)
    return head


@dataclass
class TaskFolder:
    name: str
    texts: list[str]
    head: nn.Linear | None           # None only when read with need_head=False and the task has no head
    val_texts: list[str] | None = None
    val_labels: list[int] | None = None
    head_path: str | None = None     # where the head was read (the task folder's, or the model folder's)


def _read_text(path: Path) -> str:
    """A UTF-8 text file, or one line saying where it is not."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise MergelabError(f"{path}:{line}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise MergelabError(f"{path}: cannot read ({e.strerror})") from None


def read_data_dir(path: str | Path, num_tasks: int, hidden_size: int | None = None,
                  model_paths: Sequence[str] | None = None, need_head: bool = True) -> list[TaskFolder]:
    """`--data` folder: one sub-folder per task, in the order of the recipe's models (the order of
    `tasks.txt` if present, else sorted names), each with `inputs.txt` (one unlabelled text per
    line), `head.safetensors` (`weight` [C, H], optional `bias` [C]; if absent, the one in the
    task's model folder, as `mergelab bench` saves its fine-tunes) and optionally `val.tsv`
    (`label<TAB>text` per line, integer labels) for the validation-accuracy curve. ``need_head`` False
    (RegMean, which only reads inputs): a task without a head gets ``head`` None; a head that is there
    is still checked."""
    root = Path(path)
    if not root.is_dir():
        raise MergelabError(f"--data {root}: not a folder")
    if (root / "tasks.txt").is_file():
        names = [ln.strip() for ln in _read_text(root / "tasks.txt").splitlines() if ln.strip()]
    else:
        names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(names) != num_tasks:
        raise MergelabError(f"--data {root}: {len(names)} task folders for {num_tasks} models")
    tasks = []
    for i, name in enumerate(names):
        d = root / name
        inp, hp = d / "inputs.txt", d / "head.safetensors"
        if not hp.is_file() and model_paths is not None and (Path(model_paths[i]) / "head.safetensors").is_file():
            hp = Path(model_paths[i]) / "head.safetensors"
        if not inp.is_file():
            raise MergelabError(f"{inp}: missing (one unlabelled text per line)")
        if not hp.is_file() and need_head:
            raise MergelabError(f"{hp}: missing (tensors 'weight' [C, H] and 'bias' [C])")
        texts = [ln for ln in _read_text(inp).splitlines() if ln.strip()]
        if not texts:
            raise MergelabError(f"{inp}: no texts")
        if not hp.is_file():
            tasks.append(TaskFolder(name, texts, None, *_read_val(d / "val.tsv", None)))
            continue
        from mergelab.io.head import load_head_file
        w, b = load_head_file(hp)
        if w is None or w.dim() != 2 or not w.is_floating_point() or 0 in w.shape:
            raise MergelabError(f"{hp}: needs a non-empty 2-D floating-point tensor 'weight' [classes, hidden]")
        if b is not None and not b.is_floating_point():
            raise MergelabError(f"{hp}: 'bias' must be a floating-point tensor")
        check_finite(w, str(hp), "weight")
        if b is not None:
            check_finite(b, str(hp), "bias")
        if hidden_size is not None and w.shape[1] != hidden_size:
            raise MergelabError(f"{hp}: 'weight' has {w.shape[1]} columns, the encoder's hidden size is {hidden_size}")
        vt, vl = _read_val(d / "val.tsv", w.shape[0])
        head = linear_head(w, b)
        if _head_kind(hp) == "zero_shot":  # `mergelab bench` zero-shot head: cosine logits
            from mergelab.io.head import ZeroShotHead
            zs = ZeroShotHead(w.shape[1], w.shape[0], bias=b is not None)
            zs.load_state_dict(head.state_dict())
            head = zs.requires_grad_(False)
        tasks.append(TaskFolder(name, texts, head, vt, vl, str(hp)))
    return tasks


def _read_val(vp: Path, num_classes: int | None) -> tuple[list[str] | None, list[int] | None]:
    """(texts, labels) of an optional val.tsv; labels checked against the head's classes when known."""
    if not vp.is_file():
        return None, None
    vt, vl = [], []
    for i, ln in enumerate(_read_text(vp).splitlines(), 1):
        if not ln.strip():
            continue
        lab, sep, text = ln.partition("\t")
        if not sep or not lab.strip().lstrip("-").isdigit():
            raise MergelabError(f"{vp}:{i}: expected 'label<TAB>text' with an integer label")
        if num_classes is not None and not 0 <= int(lab) < num_classes:
            raise MergelabError(f"{vp}:{i}: label {lab} outside 0..{num_classes - 1}")
        vl.append(int(lab))
        vt.append(text)
    return vt, vl


def _head_kind(path: Path) -> str:
    """The ``head`` metadata of a head.safetensors (``zero_shot`` normalises the input first)."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as fh:
        return (fh.metadata() or {}).get("head", "linear")


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    return [list(ids) for ids in enc["input_ids"]]


def accuracy_fn(fm, heads: Sequence[nn.Module], val_seqs: Sequence[Sequence[Sequence[int]]],
                val_labels: Sequence[Sequence[int]], batch_size: int = 64, pad_id: int = 0):
    """eval_fn for adamerging/concrete_merge: average accuracy over tasks of head_t(merged(x))."""

    def evaluate(state_dict) -> float:
        accs = []
        with torch.no_grad():
            for head, seqs, labels in zip(heads, val_seqs, val_labels):
                correct = 0
                for i in range(0, len(seqs), batch_size):
                    logits = fm(state_dict, pad_batch(seqs[i:i + batch_size], pad_id), head)
                    correct += int((logits.argmax(-1).cpu() == torch.tensor(labels[i:i + batch_size])).sum())
                accs.append(correct / len(seqs))
        return sum(accs) / len(accs)

    return evaluate
