#!/usr/bin/env python
"""The recipe corpus table: every recipe of tests/recipes/ (real recipes, each with its source) run unchanged on tiny
stand-ins with mergekit 0.1.5 and with mergelab, and compared (tests/test_recipes_mergekit.py asserts the same).

    PYTHONPATH=src:. HF_HUB_OFFLINE=1 python benchmarks/recipe_corpus.py [OUT.md]
"""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_recipes_mergekit import corpus_table  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = corpus_table(Path(tmp))
    lines = ["| recipe | source | method | features | mergekit | mergelab | agree | max abs diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ml = "ok" if r["mergelab"] == "ok" else "refused"
        mk = "ok" if r["mergekit"] == "ok" else "refused"
        diff = "" if "max_abs" not in r else ("0" if r["max_abs"] == 0 else f"{r['max_abs']:.3g}")
        agree = ("yes (both refuse)" if mk == ml == "refused" else
                 "yes" + (" (random masks: statistics)" if r["method"] in ("dare_ties", "della") else "")
                 if r.get("agree") else f"NO: {r.get('why', '')}")
        lines.append(f"| {r['recipe']} | {r['source']} | {r['method']} | {r['features']} | {mk} | {ml} | {agree} "
                     f"| {diff} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(text)


if __name__ == "__main__":
    main()
