#!/usr/bin/env python
"""How hard is a ``gcide_to_wordnet`` class subset for the frozen base? (issue 15: a target whose OOD side is
hard for the frozen base). For each subset: the linear probe on frozen MiniLM features (Ratatouille's LP row,
trained on the target's train split of data seed 0) scored on val, the ID test and the OOD test (every WordNet
gloss of those fields), with the OOD split's size per class. No fine-tuning: seconds per subset.

    python benchmarks/ratatouille_target_screen.py [--out screen.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

SUBSETS = {
    "13 fields (the experiment's)": ["law", "military", "chemistry", "medicine", "music", "mathematics", "astronomy",
                                     "geology", "botany", "zoology", "anatomy", "architecture", "nautical"],
    "life sciences 4": ["botany", "zoology", "anatomy", "medicine"],
    "sciences 6": ["chemistry", "medicine", "botany", "zoology", "anatomy", "geology"],
    "physical sciences 4": ["chemistry", "geology", "astronomy", "mathematics"],
    "natural sciences 8": ["chemistry", "medicine", "botany", "zoology", "anatomy", "geology", "astronomy",
                           "mathematics"],
    "applied 4": ["architecture", "nautical", "military", "law"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from mergelab.recycle.pipeline import resolve_base
    from mergelab.recycle.text import build_text_bundle
    from mergelab.recycle.train import Classifier, Split, accuracy, load_encoder, probe_head
    torch.set_num_threads(a.threads)
    base = resolve_base("minilm")
    encoder = load_encoder(base).eval()
    results = {}
    print("| subset | classes | chance | LP val | LP ID test | LP OOD test | OOD n (per class) | s |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for label, classes in SUBSETS.items():
        t0 = time.perf_counter()
        cfg = SimpleNamespace(target={"task": "gcide_to_wordnet", "classes": classes, "n_train": 1000, "n_val": 250,
                                      "n_test": 750, "ood_per_class": 100000, "seed": 0},
                              max_length=64, aux_tasks=[], aux_n_val=0, aux_n_train=0)
        bundle = build_text_bundle(cfg, base)
        target = bundle["target"]
        head = probe_head(encoder, Split.from_json(target["train"]), len(classes), pad_id=bundle["pad_id"], seed=0)
        model = Classifier(encoder, head)
        row = {"classes": classes, "chance": 1 / len(classes), "ood_available": bundle["meta"]["ood_available"]}
        for split in ("val", "test_id", "test_ood"):
            row[split], _ = accuracy(model, Split.from_json(target[split]), pad_id=bundle["pad_id"])
            row[f"n_{split}"] = len(target[split]["labels"])
        row["seconds"] = time.perf_counter() - t0
        results[label] = row
        per = ", ".join(f"{k} {v}" for k, v in row["ood_available"].items())
        print(f"| {label} | {len(classes)} | {100 * row['chance']:.1f} | {100 * row['val']:.1f} | "
              f"{100 * row['test_id']:.1f} | {100 * row['test_ood']:.1f} | {row['n_test_ood']} ({per}) | "
              f"{row['seconds']:.0f} |", flush=True)
    if a.out:
        a.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
