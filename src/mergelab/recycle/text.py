"""The built-in text target with an out-of-distribution split, from real Debian corpora.

``gcide_to_wordnet``: the subject domain of a dictionary definition (law, military, chemistry,
medicine, music).  In distribution: senses of the Collaborative International Dictionary of English
(GCIDE, i.e. Webster 1913 + additions) marked ``(Law)``, ``(Mil.)``, ``(Chem.)``, ``(Med.)``,
``(Mus.)`` (`dict-gcide`).  Out of distribution: WordNet 3.0 glosses (`wordnet-base`) of the synsets
whose *topic domain* pointer (``;c``) leads to the same field (the domain synset or one of its
hypernyms is the field's synset, e.g. ``psychiatry -> medicine``); a leading label such as
``(law)`` or ``(psychiatry)``, which 30% of these glosses carry, is removed (it names the class, and
the GCIDE side has its ``(Law)`` mark removed too).  Same label set, another
dictionary written a century later with another style: a source shift as in DomainBed.  Texts that
occur in both sources are dropped from the OOD side, and auxiliary tasks never see a target text.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Mapping, Sequence

from mergelab.errors import MergelabError

# the topic-domain synsets of WordNet 3.0 for each field (offsets in data.noun)
WORDNET_DOMAIN_ROOTS = {
    "law": ["08441203", "00611143"],
    "military": ["08199025"],
    "chemistry": ["06084469"],
    "medicine": ["06043075", "00612160"],
    "music": ["07020895", "00543233", "05718935", "05718556"],
}
# more fields, for a harder target (``target.classes``): the GCIDE marks of ``gcide``/``gcide2``
# and the WordNet topic-domain synsets with the same meaning
EXTRA_DOMAIN_ROOTS = {
    "mathematics": ["06000644"],
    "astronomy": ["06095022"],
    "geology": ["06115701"],
    "botany": ["06066555"],
    "zoology": ["06083243"],
    "anatomy": ["06057539"],
    "architecture": ["06123363"],
    "nautical": ["00314469"],      # seafaring (GCIDE's (Naut.))
}
ALL_DOMAIN_ROOTS = {**WORDNET_DOMAIN_ROOTS, **EXTRA_DOMAIN_ROOTS}
BUILDER_VERSION = 2   # bump when the splits built from the same recipe change
_LEADING_LABEL = re.compile(r"^(\([^()]*\)\s*)+")
TARGET_CLASSES = ["law", "military", "chemistry", "medicine", "music"]
DESCRIPTION = ("subject domain of a definition: GCIDE (Webster 1913) senses in distribution, "
               "WordNet 3.0 glosses with the same topic domain out of distribution")


def _synsets(path: Path) -> dict[str, tuple[list[tuple[str, str, str]], str]]:
    """offset -> (pointers (symbol, target offset, target pos), gloss) of a WordNet data file."""
    out = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  ") or "|" not in line:
                continue
            head, gloss = line.split("|", 1)
            f = head.split()
            n_words = int(f[3], 16)
            i = 4 + 2 * n_words
            ptrs = [tuple(f[i + 1 + 4 * k:i + 4 + 4 * k]) for k in range(int(f[i]))]
            out[f[0]] = (ptrs, gloss)
    return out


def read_wordnet_domains(root: Path | None = None,
                         roots: Mapping[str, Sequence[str]] = WORDNET_DOMAIN_ROOTS) -> list[tuple[str, str]]:
    """``(gloss, field)`` for every noun or verb synset with a topic domain under exactly one field."""
    from mergelab.bench.data import WORDNET_DIR, _need, clean_text
    root = root or WORDNET_DIR
    for pos in ("noun", "verb"):
        _need(root / f"data.{pos}", ["wordnet-base"])
    nouns = _synsets(root / "data.noun")
    verbs = _synsets(root / "data.verb")
    field_of_root = {off: name for name, offs in roots.items() for off in offs}
    memo: dict[str, set[str]] = {}

    def fields(off: str) -> set[str]:
        """Fields whose root is ``off`` or one of its hypernyms (not instance-of links)."""
        if off not in memo:
            memo[off] = set()
            found = {field_of_root[off]} if off in field_of_root else set()
            for sym, t, pos in nouns.get(off, ([], ""))[0]:
                if sym == "@" and pos == "n":
                    found |= fields(t)
            memo[off] = found
        return memo[off]

    out = []
    for table in (nouns, verbs):
        for off, (ptrs, gloss) in table.items():
            labels = set()
            for sym, t, pos in ptrs:
                if sym == ";c" and pos == "n":
                    labels |= fields(t)
            if len(labels) != 1:
                continue
            text = clean_text(re.split(r';\s*"', gloss)[0])
            text = _LEADING_LABEL.sub("", text)   # "(law) ..." names the class: drop it, as the GCIDE mark is
            if len(text) >= 10:
                out.append((text, labels.pop()))
    return out


def _tokenize(tokenizer, pairs: Sequence[tuple[str, int]], max_length: int) -> dict:
    enc = tokenizer([t for t, _ in pairs], truncation=True, max_length=max_length, padding=False)
    return {"ids": [list(map(int, x)) for x in enc["input_ids"]], "labels": [int(y) for _, y in pairs]}


def build_text_bundle(cfg, base: str) -> dict:
    """Read the corpora, split them (fixed seeds) and tokenize with the base model's tokenizer."""
    from transformers import AutoTokenizer

    from mergelab.bench.data import GCIDE2_DOMAINS, GCIDE_DOMAINS, TASKS, read_examples, read_gcide, split_balanced

    t = dict(cfg.target)
    if t.get("task") != "gcide_to_wordnet":
        raise MergelabError(f"target.task: only 'gcide_to_wordnet' is built in, got {t.get('task')!r}; "
                            "other targets can be given as a pre-tokenized bundle with 'data:'")
    bad = set(t) - {"task", "classes", "n_train", "n_val", "n_test", "ood_per_class", "seed"}
    if bad:
        raise MergelabError(f"target: unknown key {sorted(bad)[0]!r}")
    classes = list(t.get("classes") or TARGET_CLASSES)
    unknown = [c for c in classes if c not in ALL_DOMAIN_ROOTS]
    if unknown or len(classes) < 2 or len(set(classes)) != len(classes):
        raise MergelabError(f"target.classes: choose at least two distinct of {sorted(ALL_DOMAIN_ROOTS)}, "
                            f"got {classes}")
    n_train, n_val, n_test = int(t.get("n_train", 1000)), int(t.get("n_val", 250)), int(t.get("n_test", 750))
    per_class, seed = int(t.get("ood_per_class", 300)), int(t.get("seed", 0))

    # the fields in play: the five of the default target plus the classes asked for (so the default
    # target's data are what they were); a sense or gloss marked with two fields in play is dropped
    in_play = list(dict.fromkeys(TARGET_CLASSES + classes))
    if set(classes) <= set(GCIDE_DOMAINS.values()):
        ident = read_examples("gcide")
    else:
        marks = {k: v for k, v in {**GCIDE_DOMAINS, **GCIDE2_DOMAINS}.items() if v in set(GCIDE_DOMAINS.values()) | set(classes)}
        ident = read_gcide(None, marks)
    ident = [(x, y) for x, y in ident if y in classes]
    test_id, val, train = split_balanced(ident, classes, [n_test, n_val, n_train], seed=seed)
    seen = {x.casefold() for x, _ in ident}
    ood_all: dict[int, list[str]] = {i: [] for i in range(len(classes))}
    for x, y in read_wordnet_domains(roots={c: ALL_DOMAIN_ROOTS[c] for c in in_play}):
        if y in classes and x.casefold() not in seen:
            seen.add(x.casefold())
            ood_all[classes.index(y)].append(x)
    rng = random.Random(seed)
    test_ood = []
    for i, texts in ood_all.items():
        texts = sorted(texts)
        rng.shuffle(texts)
        test_ood += [(x, i) for x in texts[:per_class]]
    rng.shuffle(test_ood)
    if min(len(v) for v in ood_all.values()) == 0:
        raise MergelabError("wordnet-base: no out-of-distribution glosses for some target class")

    tokenizer = AutoTokenizer.from_pretrained(base)
    bundle = {
        "pad_id": int(tokenizer.pad_token_id or 0),
        "target": {"classes": classes, "train": _tokenize(tokenizer, train, cfg.max_length),
                   "val": _tokenize(tokenizer, val, cfg.max_length),
                   "test_id": _tokenize(tokenizer, test_id, cfg.max_length),
                   "test_ood": _tokenize(tokenizer, test_ood, cfg.max_length)},
        "aux": {},
        "meta": {"description": DESCRIPTION,
                 "ood_available": {classes[i]: len(v) for i, v in ood_all.items()}},
    }
    for name in cfg.aux_tasks:
        if name not in TASKS:
            raise MergelabError(f"auxiliary.tasks: unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
        if name in ("gcide", "gcide2"):
            raise MergelabError(f"auxiliary.tasks: {name!r} is the target's own corpus; choose another task")
        spec = TASKS[name]
        examples = [(x, y) for x, y in read_examples(name) if x.casefold() not in seen]   # no target text
        aux_classes = list(spec.classes) if spec.classes else sorted({y for _, y in examples})
        a_val, a_train = split_balanced(examples, aux_classes, [cfg.aux_n_val, cfg.aux_n_train], seed=seed)
        if not a_train or not a_val:
            raise MergelabError(f"auxiliary task {name!r}: not enough examples")
        bundle["aux"][name] = {"classes": aux_classes, "train": _tokenize(tokenizer, a_train, cfg.max_length),
                               "val": _tokenize(tokenizer, a_val, cfg.max_length)}
    return bundle
