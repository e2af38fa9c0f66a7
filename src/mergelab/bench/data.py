"""Task loaders for the real CPU benchmark: six text-classification tasks built from Debian corpora.

Every task is a list of ``(text, label)`` examples read from files that Debian packages install
(`fortunes*`, `dict-foldoc`, `dict-gcide`, `wordnet-base`; see ``scripts/install_data.sh``).
``load_task(name, ...)`` turns them into fixed-seed, class-balanced, disjoint train / validation /
test splits.  New tasks are added with ``register_task`` (a small Python class or function) or with
a YAML file (see ``docs/bench.md``).
"""
from __future__ import annotations

import gzip
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from mergelab.errors import MergelabError

INSTALL_HINT = "run scripts/install_data.sh (or: apt-get install -y {pkgs})"

FORTUNES_DIR = Path("/usr/share/games/fortunes")
DICTD_DIR = Path("/usr/share/dictd")
WORDNET_DIR = Path("/usr/share/wordnet")

# WordNet lexicographer file numbers (WordNet 3.0 `lexnames`).
LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
]

MAX_CHARS = 400  # texts are cut here: the encoder sees at most ~64 tokens anyway


@dataclass
class Split:
    """One split of a task: parallel lists of texts and integer labels."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class TaskData:
    """A loaded task: class names and the three disjoint splits."""

    name: str
    classes: list[str]
    train: Split
    val: Split
    test: Split
    description: str = ""
    available: dict[str, int] = field(default_factory=dict)  # examples per class before splitting
    prompts: list[list[str]] = field(default_factory=list)  # zero-shot prompts per class (TaskSpec.prompts)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


@dataclass
class TaskSpec:
    """How to read one task: ``read()`` returns all ``(text, class_name)`` examples."""

    name: str
    description: str
    read: Callable[[], list[tuple[str, str]]]
    classes: Sequence[str] | None = None  # keep only these (in this order); None = all found
    packages: Sequence[str] = ()
    # zero-shot head (docs/bench.md): natural-language name per class label (default: the label)
    # and prompt templates with one "{}" each; the head embeds every template(name) with the base
    class_names: Mapping[str, str] | None = None
    templates: Sequence[str] = ("{}.",)

    def prompts(self, classes: Sequence[str]) -> list[list[str]]:
        """One list of prompts per class (``template.format(name)`` for every template)."""
        names = dict(self.class_names or {})
        return [[t.format(names.get(c, c)) for t in self.templates] for c in classes]


TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec, overwrite: bool = False) -> TaskSpec:
    """Add a task to the registry so that suites and ``load_task`` can name it."""
    if spec.name in TASKS and not overwrite:
        raise MergelabError(f"task {spec.name!r} is already registered")
    TASKS[spec.name] = spec
    return spec


def list_tasks() -> list[str]:
    return sorted(TASKS)


# ----------------------------------------------------------------------------- text helpers
def clean_text(text: str, max_chars: int = MAX_CHARS) -> str:
    """Collapse whitespace, drop control characters and cut to ``max_chars``."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    text = re.sub(r"\s+", " ", text).strip()
    return text[:max_chars]


def _need(path: Path, packages: Iterable[str]) -> None:
    if not path.exists():
        pkgs = " ".join(packages)
        raise MergelabError(f"{path} not found (Debian package(s) {pkgs}): "
                            + INSTALL_HINT.format(pkgs=pkgs))


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def parse_fortune_file(path: Path, min_chars: int = 20, max_chars: int = 1000) -> list[str]:
    """Records of a fortune file are separated by lines holding only ``%``."""
    out = []
    for rec in re.split(r"^%\s*$", _read_text(path), flags=re.M):
        rec = re.sub(r".\x08", "", rec)  # overstriking (bold/underline) in old fortune files
        if not (min_chars <= len(rec.strip()) <= max_chars):
            continue  # too short to classify, or ASCII art / long stories
        out.append(clean_text(rec))
    return out


def _fortune_files(folder: Path) -> list[Path]:
    """Plain fortune files of a folder: no ``.dat`` / ``.u8`` indexes, no links, no subfolders."""
    files = []
    for p in sorted(folder.iterdir()):
        if p.is_symlink() or not p.is_file() or p.suffix in (".dat", ".u8"):
            continue
        files.append(p)
    return files


# ----------------------------------------------------------------------------- the six tasks
FORTUNE_TOPICS = ["computers", "politics", "science", "people", "definitions", "songs-poems"]


def read_fortune_topic(root: Path | None = None) -> list[tuple[str, str]]:
    """Quote topic: the six English fortune categories named by their file."""
    root = root or FORTUNES_DIR
    out = []
    for topic in FORTUNE_TOPICS:
        path = root / topic
        _need(path, ["fortunes", "fortunes-min"])
        out += [(t, topic) for t in parse_fortune_file(path)]
    return out


FORTUNE_LANGS = {"en": None, "de": "fortunes-de", "es": "fortunes-es", "it": "fortunes-it",
                 "pl": "fortunes-pl", "cs": "fortunes-cs"}


def read_fortune_lang(root: Path | None = None) -> list[tuple[str, str]]:
    """Quote language: English = plain files at the top of the fortunes folder, others = subfolders."""
    root = root or FORTUNES_DIR
    _need(root / "computers", ["fortunes"])
    out = []
    for lang, pkg in FORTUNE_LANGS.items():
        folder = root if lang == "en" else root / lang
        _need(folder, [pkg or "fortunes"])
        for f in _fortune_files(folder):
            out += [(t, lang) for t in parse_fortune_file(f, max_chars=600)]
    return out


FOLDOC_TAGS = ["programming", "networking", "language", "jargon", "operating system", "company",
               "hardware", "mathematics"]


def _dict_entries(path: Path) -> Iterable[list[str]]:
    """dictd ``.dict.dz`` files: an entry starts at a non-indented line."""
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as fh:
        entry: list[str] = []
        for line in fh:
            line = line.rstrip("\n")
            if line and not line[0].isspace() and entry and any(
                    l.startswith((" ", "\t")) for l in entry):
                yield entry
                entry = []
            entry.append(line)
        if entry:
            yield entry


def _strip_markup(text: str) -> str:
    text = re.sub(r"\{([^{}]*)\}", r"\1", text)  # {cross references}
    return text


def read_foldoc(path: Path | None = None) -> list[tuple[str, str]]:
    """Computing-term category: the ``<tag>`` opening a FOLDOC entry's body; text = first paragraph."""
    path = path or DICTD_DIR / "foldoc.dict.dz"
    _need(path, ["dict-foldoc"])
    out = []
    for entry in _dict_entries(path):
        body = [l for l in entry if l.startswith((" ", "\t")) or not l]
        text = "\n".join(body).strip()
        m = re.match(r"<([^>]+)>\s*(.*)", text, flags=re.S)
        if not m or m.group(1) not in FOLDOC_TAGS:
            continue  # no tag, or several tags, or a rare one
        para = m.group(2).split("\n\n")[0]
        para = clean_text(_strip_markup(para))
        if len(para) >= 20:
            out.append((para, m.group(1)))
    return out


GCIDE_DOMAINS = {"Zool": "zoology", "Bot": "botany", "Med": "medicine", "Law": "law",
                 "Naut": "nautical", "Chem": "chemistry", "Mus": "music", "Mil": "military"}
_GCIDE_MARK = re.compile(r"\((Zool|Bot|Med|Law|Naut|Chem|Mus|Mil)\.?\)")


def read_gcide(path: Path | None = None, domains: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """Definition domain: a GCIDE sense marked ``(Zool.)``, ``(Law)``...; text = the sense after it."""
    path = path or DICTD_DIR / "gcide.dict.dz"
    _need(path, ["dict-gcide"])
    domains = domains or GCIDE_DOMAINS
    mark = (_GCIDE_MARK if domains is GCIDE_DOMAINS
            else re.compile(r"\((" + "|".join(map(re.escape, domains)) + r")\.?\)"))
    out = []
    for entry in _dict_entries(path):
        for para in "\n".join(entry).split("\n\n"):
            marks = set(mark.findall(para))
            if len(marks) != 1:
                continue  # no mark, or a sense spanning two domains
            m = mark.search(para)
            sense = para[m.end():]
            sense = re.split(r"\[(?:1913 Webster|PJC|Webster 1913 Suppl\.)", sense)[0]
            sense = re.sub(r"--[A-Z][\w.& ]*\.?", "", sense)  # citations
            sense = clean_text(_strip_markup(sense)).lstrip(",;:. ")
            if len(sense) >= 20:
                out.append((sense, domains[m.group(1)]))
    return out


WORDNET_NOUN = ["noun.animal", "noun.artifact", "noun.person", "noun.plant", "noun.act",
                "noun.communication", "noun.location", "noun.food"]
WORDNET_VERB = ["verb.change", "verb.contact", "verb.communication", "verb.motion",
                "verb.social", "verb.possession", "verb.stative", "verb.cognition"]


def read_wordnet(pos: str, path: Path | None = None) -> list[tuple[str, str]]:
    """Lexicographer category of a synset from its gloss (examples in quotes removed)."""
    path = path or WORDNET_DIR / f"data.{pos}"
    _need(path, ["wordnet-base"])
    out = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  ") or "|" not in line:
                continue  # licence header
            fields = line.split(" ", 3)
            lex = LEXNAMES[int(fields[1])]
            gloss = line.split("|", 1)[1]
            gloss = re.split(r';\s*"', gloss)[0]
            gloss = clean_text(gloss)
            if len(gloss) >= 10:
                out.append((gloss, lex))
    return out


# Class names and prompt templates for the zero-shot heads: written once from the label's meaning,
# never tuned on any split (docs/bench.md, "Zero-shot heads").
register_task(TaskSpec(
    "fortune_topic", "topic of an English quote (fortunes)", read_fortune_topic, FORTUNE_TOPICS,
    ["fortunes", "fortunes-min"],
    {"computers": "computers", "politics": "politics", "science": "science", "people": "famous people",
     "definitions": "the definition of a word", "songs-poems": "songs and poems"},
    ["A quotation about {}.", "A fortune cookie about {}.", "A funny saying about {}."]))
register_task(TaskSpec(
    "fortune_lang", "language of a quote (fortunes-*)", read_fortune_lang, list(FORTUNE_LANGS),
    ["fortunes"] + [p for p in FORTUNE_LANGS.values() if p],
    {"en": "English", "de": "German", "es": "Spanish", "it": "Italian", "pl": "Polish", "cs": "Czech"},
    ["A text in {}.", "A quotation written in {}.", "This sentence is in {}."]))
register_task(TaskSpec(
    "foldoc", "category of a computing term (dict-foldoc)", read_foldoc, FOLDOC_TAGS, ["dict-foldoc"],
    {"programming": "programming", "networking": "computer networking", "language": "a programming language",
     "jargon": "hacker jargon", "operating system": "an operating system", "company": "a company",
     "hardware": "computer hardware", "mathematics": "mathematics"},
    ["A computing dictionary entry about {}.", "A definition of a term from {}.", "This is about {}."]))
register_task(TaskSpec(
    "gcide", "subject domain of a definition (dict-gcide)", read_gcide, list(GCIDE_DOMAINS.values()),
    ["dict-gcide"],
    {"nautical": "ships and sailing"},
    ["A dictionary definition from {}.", "A definition of a term used in {}.", "A word from {}."]))
register_task(TaskSpec(
    "wordnet_noun", "WordNet noun category from a gloss (wordnet-base)", lambda: read_wordnet("noun"),
    WORDNET_NOUN, ["wordnet-base"],
    {"noun.animal": "an animal", "noun.artifact": "a man-made object", "noun.person": "a person",
     "noun.plant": "a plant", "noun.act": "an action or activity", "noun.communication": "communication",
     "noun.location": "a place", "noun.food": "food or drink"},
    ["A dictionary definition of {}.", "The meaning of a word for {}.", "This describes {}."]))
register_task(TaskSpec(
    "wordnet_verb", "WordNet verb category from a gloss (wordnet-base)", lambda: read_wordnet("verb"),
    WORDNET_VERB, ["wordnet-base"],
    {"verb.change": "changing something", "verb.contact": "touching or hitting", "verb.communication":
     "speaking or communicating", "verb.motion": "moving", "verb.social": "social life",
     "verb.possession": "owning or giving", "verb.stative": "being in a state", "verb.cognition": "thinking"},
    ["A definition of a verb about {}.", "A word that means {}.", "An action related to {}."]))


WORDNET_NOUN2 = ["noun.body", "noun.cognition", "noun.state", "noun.attribute", "noun.substance", "noun.time",
                 "noun.quantity", "noun.group"]

register_task(TaskSpec(
    "wordnet_noun2", "WordNet noun category from a gloss, 8 other categories (wordnet-base)",
    lambda: read_wordnet("noun"), WORDNET_NOUN2, ["wordnet-base"],
    {"noun.body": "a part of the body", "noun.cognition": "a thought or idea", "noun.state": "a state or condition",
     "noun.attribute": "a quality or property", "noun.substance": "a substance or material",
     "noun.time": "a period of time", "noun.quantity": "a quantity or unit of measure",
     "noun.group": "a group of people or things"},
    ["A dictionary definition of {}.", "The meaning of a word for {}.", "This describes {}."]))


WORDNET_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}


def read_wordnet_pos() -> list[tuple[str, str]]:
    """Part of speech of a WordNet synset from its gloss (the data file it comes from)."""
    out = []
    for pos in WORDNET_POS:
        out += [(g, pos) for g, _ in read_wordnet(pos)]
    return out


register_task(TaskSpec(
    "wordnet_pos", "part of speech of a WordNet gloss (wordnet-base)", read_wordnet_pos, list(WORDNET_POS),
    ["wordnet-base"], WORDNET_POS,
    ["A dictionary definition of a {}.", "The meaning of a {}.", "A gloss for a {} in a dictionary."]))

GCIDE2_DOMAINS = {"Anat": "anatomy", "Arch": "architecture", "Math": "mathematics", "Astron": "astronomy",
                  "Geol": "geology", "Her": "heraldry", "Gram": "grammar", "Eccl": "the church"}


def read_gcide2(path: Path | None = None) -> list[tuple[str, str]]:
    """Definition domain, eight more GCIDE marks: (Anat.) (Arch.) (Math.) (Astron.) (Geol.) (Her.)..."""
    return read_gcide(path, GCIDE2_DOMAINS)


register_task(TaskSpec(
    "gcide2", "subject domain of a definition, 8 other domains (dict-gcide)", read_gcide2,
    list(GCIDE2_DOMAINS.values()), ["dict-gcide"], {},
    ["A dictionary definition from {}.", "A definition of a term used in {}.", "A word from {}."]))

FORTUNE_TOPICS2 = ["work", "men-women", "art", "wisdom", "literature", "startrek", "law", "education"]


def read_fortune_topic2(root: Path | None = None) -> list[tuple[str, str]]:
    """Quote topic, eight other English fortune files."""
    root = root or FORTUNES_DIR
    out = []
    for topic in FORTUNE_TOPICS2:
        path = root / topic
        _need(path, ["fortunes"])
        out += [(t, topic) for t in parse_fortune_file(path)]
    return out


register_task(TaskSpec(
    "fortune_topic2", "topic of an English quote, 8 other files (fortunes)", read_fortune_topic2,
    FORTUNE_TOPICS2, ["fortunes"],
    {"work": "work and jobs", "men-women": "men and women", "art": "art and artists", "wisdom": "wisdom",
     "literature": "books and literature", "startrek": "Star Trek", "law": "law and lawyers",
     "education": "school and education"},
    ["A quotation about {}.", "A fortune cookie about {}.", "A funny saying about {}."]))


# ----------------------------------------------------------------------------- splits
def split_balanced(examples: Sequence[tuple[str, str]], classes: Sequence[str],
                   sizes: Sequence[int], seed: int = 0) -> list[list[tuple[str, int]]]:
    """Deterministic, disjoint, class-balanced splits.

    Texts are de-duplicated first, case-insensitively (so no text can be in two splits; a text
    found under two labels is dropped), each class is shuffled with
    ``seed``, and every split (in the order given: put test first so that it is filled first) draws
    round-robin over the classes' remaining examples: balanced where the data allows, filled from
    the larger classes when a class runs out.  Returns one list of ``(text, class_index)`` per split.
    """
    index = {c: i for i, c in enumerate(classes)}
    pools: dict[int, list[str]] = {i: [] for i in range(len(classes))}
    labels_of: dict[str, set[str]] = {}
    first: dict[str, str] = {}
    for text, label in examples:
        key = text.casefold()
        labels_of.setdefault(key, set()).add(label)
        if key not in first or text < first[key]:
            first[key] = text  # the same representative whatever the input order
    for key, labels in labels_of.items():
        if len(labels) == 1:  # a text listed under two labels is ambiguous: dropped
            (label,) = labels
            if label in index:
                pools[index[label]].append(first[key])
    rng = random.Random(seed)
    for i in pools:
        pools[i].sort()  # independent of file order
        rng.shuffle(pools[i])
    out = []
    for n in sizes:
        split: list[tuple[str, int]] = []
        while len(split) < n and any(pools.values()):
            for i in range(len(classes)):
                if pools[i] and len(split) < n:
                    split.append((pools[i].pop(), i))
        rng.shuffle(split)
        out.append(split)
    return out


_CACHE: dict[tuple[str, Callable], list[tuple[str, str]]] = {}


def read_examples(name: str, spec: TaskSpec | None = None) -> list[tuple[str, str]]:
    """All ``(text, class_name)`` examples of a registered task, or of ``spec`` (read once per
    process and reader)."""
    if spec is None:
        if name not in TASKS:
            raise MergelabError(f"unknown task {name!r}; known: {', '.join(list_tasks())}")
        spec = TASKS[name]
    key = (name, spec.read)
    if key not in _CACHE:
        _CACHE[key] = spec.read()
    return _CACHE[key]


def load_task(name: str, n_train: int = 2000, n_val: int = 500, n_test: int = 1000,
              seed: int = 0, min_per_class: int = 0, spec: TaskSpec | None = None) -> TaskData:
    """Load a registered task (or the given ``spec``: a suite's own version of it) as fixed-seed
    disjoint train / val / test splits.

    Classes come from the task's spec (or all labels found); classes with fewer than
    ``min_per_class`` examples are dropped.  Actual sizes can be below the requested ones when the
    data is short; ``TaskData.sizes()`` records them.
    """
    examples = read_examples(name, spec)
    spec = spec or TASKS[name]
    counts: dict[str, int] = {}
    for _, label in examples:
        counts[label] = counts.get(label, 0) + 1
    classes = list(spec.classes) if spec.classes else sorted(counts)
    classes = [c for c in classes if counts.get(c, 0) > max(min_per_class, 0)]
    if len(classes) < 2:
        raise MergelabError(f"task {name!r}: fewer than two classes with data ({counts})")
    test, val, train = split_balanced(examples, classes, [n_test, n_val, n_train], seed=seed)
    if not train or not test:
        raise MergelabError(f"task {name!r}: not enough examples ({sum(counts.values())})")

    def mk(split):
        return Split([t for t, _ in split], [y for _, y in split])

    return TaskData(name, classes, mk(train), mk(val), mk(test), spec.description,
                    {c: counts.get(c, 0) for c in classes}, spec.prompts(classes))
