"""Task selection: how much does fine-tuning gain over the zero-shot head, per task, on validation?

``python -m mergelab.bench.select --tasks a,b,c --steps 150 --out sel.jsonl`` builds each task's
zero-shot head from the base, fine-tunes through it with the given budget and prints (and appends
to ``--out``) the validation accuracy of the zero-shot head and of the fine-tune, with the time.
Only validation is used: the test split stays untouched for the benchmark's final evaluation.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch


def measure(name: str, n_train: int, n_val: int, steps: int, lr: float, batch_size: int = 32,
            max_len: int = 32, scale: float = 20.0, weight_decay: float = 0.1, warmup: float = 0.1,
            n_test: int = 1000, base=None, seed: int = 0) -> dict:
    """Zero-shot and fine-tuned validation accuracy of one task (see the module docstring)."""
    from mergelab.bench import data, train
    from mergelab.bench.evaluate import evaluate

    enc, tok = base if base is not None else train.load_base_encoder()
    pad = tok.pad_token_id or 0
    td = data.load_task(name, n_train, n_val, n_test, seed=0)  # the benchmark's splits; test unused
    tr = train.tokenize(tok, td.train.texts, max_len)
    va = train.tokenize(tok, td.val.texts, max_len)
    head = train.zero_shot_head(enc, tok, td.prompts, scale=scale, max_len=max_len)
    zs = evaluate(enc, head, va, td.val.labels, pad_id=pad).accuracy
    work = copy.deepcopy(enc)
    t0 = time.perf_counter()
    train.finetune(work, head, tr, td.train.labels, steps=steps, lr=lr, batch_size=batch_size,
                   weight_decay=weight_decay, warmup=warmup, seed=seed, pad_id=pad, schedule="cosine",
                   freeze_embeddings=True)
    dt = time.perf_counter() - t0
    ft = evaluate(work, head, va, td.val.labels, pad_id=pad).accuracy
    return {"task": name, "classes": len(td.classes), "sizes": td.sizes(), "steps": steps, "lr": lr,
            "batch_size": batch_size, "max_len": max_len, "scale": scale, "val_zero_shot": zs,
            "val_finetuned": ft, "gain": ft - zs, "train_seconds": round(dt, 1),
            "mean_train_tokens": sum(map(len, tr)) / len(tr)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--scale", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from mergelab.bench import train
    base = train.load_base_encoder()
    for name in a.tasks.split(","):
        r = measure(name, a.n_train, a.n_val, a.steps, a.lr, max_len=a.max_len, scale=a.scale, base=base)
        print(f"{name:<16} zero-shot {100 * r['val_zero_shot']:5.1f}  fine-tuned {100 * r['val_finetuned']:5.1f}"
              f"  gain {100 * r['gain']:+5.1f}  ({r['train_seconds']:.0f} s, {a.steps} steps)", flush=True)
        if a.out:
            with open(a.out, "a") as fh:
                fh.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
