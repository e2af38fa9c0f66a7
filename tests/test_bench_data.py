"""Task loaders on small samples of the real Debian files (installed by scripts/install_data.sh)."""
import gzip
import itertools
import os
from pathlib import Path

import pytest

from mergelab.bench import data
from mergelab.errors import MergelabError

FILES = {
    "fortunes": data.FORTUNES_DIR / "computers",
    "fortunes-de": data.FORTUNES_DIR / "de",
    "dict-foldoc": data.DICTD_DIR / "foldoc.dict.dz",
    "dict-gcide": data.DICTD_DIR / "gcide.dict.dz",
    "wordnet-base": data.WORDNET_DIR / "data.verb",
}


@pytest.fixture(scope="module", autouse=True)
def debian_data():
    missing = [pkg for pkg, path in FILES.items() if not path.exists()]
    if missing:
        pytest.fail(f"benchmark data packages missing ({', '.join(missing)}): "
                    "run scripts/install_data.sh (make installs them)", pytrace=False)


def _first_records(path: Path, n: int) -> str:
    """The first n '%'-separated records of a real fortune file."""
    text = path.read_text(encoding="utf-8", errors="replace")
    parts = text.split("\n%\n")
    return "\n%\n".join(parts[:n]) + "\n%\n"


def _gz_head(path: Path, n_lines: int, out: Path) -> Path:
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as fh:
        lines = list(itertools.islice(fh, n_lines))
    with gzip.open(out, "wt", encoding="utf-8") as fh:
        fh.writelines(lines)
    return out


def test_parse_fortune_file_sample(tmp_path):
    f = tmp_path / "computers"
    f.write_text(_first_records(data.FORTUNES_DIR / "computers", 30), encoding="utf-8")
    recs = data.parse_fortune_file(f)
    assert 20 <= len(recs) <= 30
    assert all(len(r) >= 20 and "\n" not in r and "%" != r for r in recs)
    assert all("\x08" not in r for r in recs)  # overstriking removed


def test_fortune_lang_skips_links_indexes_and_subfolders(tmp_path):
    root = tmp_path / "fortunes"
    root.mkdir()
    (root / "computers").write_text(_first_records(data.FORTUNES_DIR / "computers", 10))
    (root / "computers.dat").write_bytes(b"\x00\x01binary index")
    os.symlink(root / "computers", root / "alias")  # a link must not double the English quotes
    for lang in ("de", "es", "it", "pl", "cs"):
        (root / lang).mkdir()
        src = next(p for p in sorted((data.FORTUNES_DIR / lang).iterdir())
                   if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"))
        (root / lang / "sample").write_text(_first_records(src, 10), encoding="utf-8")
        (root / lang / "sample.u8").write_text("should be skipped %\n%\n")
    ex = data.read_fortune_lang(root)
    langs = {lab for _, lab in ex}
    assert langs == {"en", "de", "es", "it", "pl", "cs"}
    en = [t for t, lab in ex if lab == "en"]
    assert len(en) == len(set(en)) and len(en) <= 10
    assert not any("should be skipped" in t for t, _ in ex)


def test_foldoc_sample(tmp_path):
    path = _gz_head(data.DICTD_DIR / "foldoc.dict.dz", 4000, tmp_path / "foldoc.dict.dz")
    ex = data.read_foldoc(path)
    assert len(ex) > 20
    assert {lab for _, lab in ex} <= set(data.FOLDOC_TAGS)
    adt = [t for t, lab in ex if t.startswith("(ADT) A kind of data abstraction")]
    assert adt and dict(ex)[adt[0]] == "programming"
    assert not any("{" in t or t.startswith("<") for t, _ in ex)


def test_gcide_sample(tmp_path):
    path = _gz_head(data.DICTD_DIR / "gcide.dict.dz", 20000, tmp_path / "gcide.dict.dz")
    ex = data.read_gcide(path)
    assert len(ex) > 50
    assert {lab for _, lab in ex} <= set(data.GCIDE_DOMAINS.values())
    assert len({lab for _, lab in ex}) >= 5
    for t, _ in ex:
        assert "[1913 Webster]" not in t and "(Zool.)" not in t and "(Bot.)" not in t
        assert len(t) >= 20


def test_wordnet_sample(tmp_path):
    lines = (data.WORDNET_DIR / "data.verb").read_text(encoding="utf-8").splitlines(True)
    (tmp_path / "data.verb").write_text("".join(lines[:200]))
    ex = data.read_wordnet("verb", tmp_path / "data.verb")
    assert len(ex) > 100  # the 29-line licence header is skipped
    assert ("cause to be calm or quiet as by administering a sedative to", "verb.body") in ex
    assert not any('"' in t for t, _ in ex)  # example sentences removed
    assert data.LEXNAMES[29] == "verb.body" and data.LEXNAMES[44] == "adj.ppl"


def test_missing_file_names_the_package(tmp_path):
    with pytest.raises(MergelabError, match="dict-foldoc.*install_data"):
        data.read_foldoc(tmp_path / "nope.dict.dz")


def test_registered_text6_tasks():
    for name in ["fortune_topic", "fortune_lang", "foldoc", "gcide", "wordnet_noun", "wordnet_verb"]:
        assert name in data.TASKS and data.TASKS[name].packages
