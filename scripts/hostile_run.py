#!/usr/bin/env python
"""A hostile user against every command: bad inputs, hostile OUT_DIRs, a full or read-only disk, signals.

Builds tiny real checkpoints (BERT folders, PEFT LoRA adapters, adapt data folders, a recycle bundle) and
large-enough safetensors for the signal cases, then runs the real CLI (``python -m mergelab``) in a
subprocess per case and checks, for every case:

- exit code 2 (signals: 128 + the signal), stderr exactly one line, ``mergelab: error: ...`` with the
  expected cause, no ``Traceback``;
- every input unchanged (SHA-256 of every file of the world and of the case's own inputs);
- OUT_DIR not created (or, when it existed, unchanged) and no ``.tmp-`` / ``.old-`` / ``.lock`` left anywhere.

Usage (from the repository root):
    PYTHONPATH=src HF_HUB_OFFLINE=1 python scripts/hostile_run.py [--jobs 2] [--only CLASS] [--keep DIR]

The read-only and full-disk classes mount small tmpfs folders and run only as root (skipped otherwise).
Prints one line per failing case and a table of cases by class; exit code 1 if any case failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
QUERY = "encoder.layer.0.attention.self.query"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")     # the world builder's own saves: no bars
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@dataclass
class Case:
    cls: str
    name: str
    argv: list[str]
    expect: str                      # substring of the one stderr line
    out: Path | None = None
    cwd: Path | None = None
    env: dict = field(default_factory=dict)
    code: int = 2
    existed: bool = False            # OUT_DIR existed before: must be unchanged
    inputs: list[Path] = field(default_factory=list)   # this case's own inputs, hashed too
    run: object = None               # a custom runner (signals, races): returns a list of problems
    needs_root: bool = False


def tree_hash(paths) -> dict[str, str]:
    out = {}
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(root.rglob("*")) if root.is_dir() else []
        for p in files:
            if p.is_file() and not p.is_symlink():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*")
                  if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".lock") or ".tmp" in p.suffix)


# ------------------------------------------------------------------------------------------- the world

def build_world(root: Path) -> dict:
    import torch
    import yaml
    from safetensors.torch import save_file

    from tests.helpers import make_model_folders

    base, fts = make_model_folders(root / "models", n=2)
    w = {"root": root, "base": base, "fts": fts}
    adapters = []
    for i in (1, 2):
        adapters.append(adapter(root / "adapters" / f"a{i}", i))
    w["adapters"] = adapters
    data = root / "data"
    g = torch.Generator().manual_seed(0)
    for t in ("t0", "t1"):
        (data / t).mkdir(parents=True)
        (data / t / "inputs.txt").write_text("w1 w2 w3\nw4 w5\nw6 w7 w8 w9\nw10\n")
        save_file({"weight": torch.randn(2, 32, generator=g), "bias": torch.zeros(2)}, str(data / t / "head.safetensors"))
        (data / t / "val.tsv").write_text("0\tw1 w2\n1\tw3 w4\n")
    (data / "tasks.txt").write_text("t0\nt1\n")
    w["data"] = data
    rec = root / "recipes"
    rec.mkdir()
    models = [{"model": str(m)} for m in fts]

    def recipe(name, content):
        p = rec / f"{name}.yaml"
        p.write_text(yaml.safe_dump(content))
        return p
    w["recipe"] = recipe
    w["merge"] = recipe("merge", {"merge_method": "ties", "base_model": str(base), "models": models,
                                  "parameters": {"density": 0.5}})
    w["lora"] = recipe("lora", {"merge_method": "task_arithmetic", "base_model": str(base),
                                "models": [{"model": str(a)} for a in adapters]})
    w["smile"] = recipe("smile", {"base_model": str(base), "models": models})
    w["adapt"] = recipe("adapt", {"base_model": str(base), "models": models,
                                  "parameters": {"batch_size": 2, "max_length": 8}})
    from tests.test_recycle import make_bundle
    (root / "bundle.json").write_text(json.dumps(make_bundle()))
    w["recycle"] = recipe("recycle", {"base_model": str(base), "data": str(root / "bundle.json"), "executor": "local",
                                      "auxiliary": {"checkpoints": {"given": str(fts[0])}},
                                      "runs": 1, "fusing_runs": 0, "probe_iters": 2,
                                      "hparams": {"steps": 1, "batch_size": 4}})
    (root / "afile").write_text("a file")
    (root / "outs").mkdir()
    return w


def adapter(folder: Path, seed: int, rank: int = 4, config: dict | None = None) -> Path:
    import torch
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"base_model.model.{QUERY}.lora_A.weight": torch.randn(rank, 32, generator=g) * 0.1,
               f"base_model.model.{QUERY}.lora_B.weight": torch.randn(32, rank, generator=g) * 0.1},
              str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["query"]} if config is None else config
    (folder / "adapter_config.json").write_text(json.dumps(cfg) if not isinstance(cfg, str) else cfg)
    return folder


def poisoned(src: Path, dest: Path, value: float, name: str = "encoder.layer.1.output.dense.weight") -> Path:
    from safetensors.torch import save_file

    from mergelab.io import load_state_dict
    shutil.copytree(src, dest)
    sd = load_state_dict(dest / "model.safetensors")
    sd[name].view(-1)[5] = value
    save_file(sd, str(dest / "model.safetensors"))
    return dest


def raw_safetensors(path: Path, header, data: bytes) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def cmd(w, name: str, out, recipe: Path | None = None, extra=()) -> list[str]:
    r = str(recipe or w[{"lora-merge": "lora", "concrete": "adapt"}.get(name, name)])
    base = {"merge": ["merge", r, str(out)],
            "lora-merge": ["lora-merge", r, str(out), "--rank", "4"],
            "smile": ["upscale", "smile", r, str(out), "--k", "4", "--gate-k", "2"],
            "adapt": ["adapt", "adamerging", r, str(out), "--data", str(w["data"]), "--steps", "1"],
            "concrete": ["adapt", "concrete", r, str(out), "--data", str(w["data"]), "--steps", "1",
                         "--tta-steps", "1"],
            "recycle": ["recycle", r, str(out)]}[name]
    return base + ["--quiet"] + list(extra)


WRITERS = ("merge", "lora-merge", "smile", "adapt")


# ------------------------------------------------------------------------------------------- the cases

def cases(w, scratch: Path) -> list[Case]:
    import yaml
    cs: list[Case] = []
    root, base, fts, adapters, data = w["root"], w["base"], w["fts"], w["adapters"], w["data"]
    n = iter(range(10**6))

    def case_dir() -> Path:
        d = scratch / f"c{next(n):04d}"
        d.mkdir()
        return d

    def recipe_for(command: str, **content) -> dict:
        models = ([{"model": str(a)} for a in adapters] if command == "lora-merge"
                  else [{"model": str(m)} for m in fts])
        method = {"merge": {"merge_method": "ties"}, "lora-merge": {"merge_method": "task_arithmetic"}}.get(command, {})
        return {"base_model": str(base), "models": models, **method, **content}

    def write_recipe(d: Path, content) -> Path:
        p = d / "r.yaml"
        p.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
        return p

    # ---------------------------------------------------------------- out_dir: never replace inputs/user folders
    for c in WRITERS + ("recycle",):
        input_ft = adapters[0] if c == "lora-merge" else fts[0]
        outs = {"base": (base, "is an input"), "finetune": (input_ft, "is an input"),
                "models_folder": (input_ft.parent, "contains an input"),
                "inside_input": (base / "sub", "lies inside an input"),
                "empty": ("", "OUT_DIR is empty"), "dot": (".", "is the working directory"),
                "dotdot": ("..", "contains the working directory"), "root": ("/", "root folder"),
                "parent_is_file": (root / "afile" / "o", "is a file")}
        if c == "recycle":
            outs = {k: outs[k] for k in ("base", "finetune", "models_folder", "empty", "dot", "root")}
        for k, (out, expect) in outs.items():
            d = case_dir()
            (d / "precious.txt").write_text("user data")
            cs.append(Case("out_dir", f"{c}:{k}", cmd(w, c, out, extra=["--force"]), expect,
                           out=Path(out) if str(out) not in ("", ".", "..", "/") else None, cwd=d, existed=True,
                           inputs=[d / "precious.txt"]))
        d = case_dir()
        link = d / "link"
        link.symlink_to(input_ft)
        cs.append(Case("out_dir", f"{c}:symlink_to_input", cmd(w, c, link, extra=["--force"]), "symbolic link",
                       out=None, inputs=[]))
        d = case_dir()
        (d / "mine").mkdir()
        (d / "mine" / "thesis.tex").write_text("years of work")
        cs.append(Case("out_dir", f"{c}:foreign_folder_force", cmd(w, c, d / "mine", extra=["--force"]),
                       "not written by mergelab", out=d / "mine", existed=True, inputs=[d / "mine"]))
        d = case_dir()
        (d / "home").mkdir()
        (d / "home" / ".bashrc").write_text("# mine")
        cs.append(Case("out_dir", f"{c}:home", cmd(w, c, d / "home", extra=["--force"]), "the home folder",
                       env={"HOME": str(d / "home")}, out=d / "home", existed=True, inputs=[d / "home"]))
    for c in ("adapt", "concrete"):
        cs.append(Case("out_dir", f"{c}:data_folder", cmd(w, c, data, extra=["--force"]), "is an input",
                       out=data, existed=True))
    d = case_dir()
    tok = d / "tok"
    shutil.copytree(base, tok)
    r = write_recipe(d, recipe_for("merge", tokenizer_source=str(tok)))
    cs.append(Case("out_dir", "merge:tokenizer_source", cmd(w, "merge", tok, r, ["--force"]), "is an input",
                   out=tok, existed=True, inputs=[tok, r]))
    task = _demo_task()
    for k, out, expect in (("dot", ".", "is the working directory"), ("models", root / "models", "contains an input"),
                           ("home", "~", "the home folder"), ("cache", root / "models", "contains an input")):
        d = case_dir()
        argv = ["bench", "--suite", "demo", "--out", str(out), "--quiet"]
        if k == "models":
            argv += ["--model", f"{task}={fts[0]}"]
        if k == "cache":
            argv = ["bench", "--suite", "demo", "--out", str(d / "run"), "--cache-dir", str(d / "run" / "cache"),
                    "--quiet"]
        if k == "home":
            (d / "home").mkdir()
        cs.append(Case("out_dir", f"bench:{k}", argv, expect, cwd=d, env={"HOME": str(d / "home")} if k == "home"
                       else {}))

    # ---------------------------------------------------------------- nan: finite checks in every command
    for value, word in ((float("nan"), "NaN"), (float("inf"), "Inf"), (float("-inf"), "-Inf")):
        for c in ("merge", "smile", "adapt"):
            for which in ("finetune", "base"):
                d = case_dir()
                bad = poisoned(fts[0] if which == "finetune" else base, d / "bad", value)
                content = recipe_for(c)
                if which == "finetune":
                    content["models"][0] = {"model": str(bad)}
                else:
                    content["base_model"] = str(bad)
                r = write_recipe(d, content)
                expect = "contains NaN or Inf" if c == "merge" else f"contains 1 {word.lstrip('-')}"
                cs.append(Case("nan", f"{c}:{which}:{word}", cmd(w, c, d / "out", r), expect,
                               out=d / "out", inputs=[d]))
    for value in (float("nan"), float("inf")):
        import torch
        from safetensors.torch import load_file, save_file
        d = case_dir()
        a = adapter(d / "a", 9)
        sd = load_file(str(a / "adapter_model.safetensors"))
        sd[f"base_model.model.{QUERY}.lora_A.weight"][0, 0] = value
        save_file(sd, str(a / "adapter_model.safetensors"))
        r = write_recipe(d, {**recipe_for("lora-merge"), "models": [{"model": str(a)}, {"model": str(adapters[1])}]})
        cs.append(Case("nan", f"lora-merge:adapter:{value}", cmd(w, "lora-merge", d / "out", r), "contains",
                       out=d / "out", inputs=[d]))
        d = case_dir()
        dd = d / "data"
        shutil.copytree(data, dd)
        save_file({"weight": torch.full((2, 32), value), "bias": torch.zeros(2)}, str(dd / "t1" / "head.safetensors"))
        argv = cmd(w, "adapt", d / "out")
        argv[argv.index("--data") + 1] = str(dd)
        cs.append(Case("nan", f"adapt:head:{value}", argv, "head.safetensors: tensor 'weight' contains",
                       out=d / "out", inputs=[d]))
        d = case_dir()
        bad = poisoned(fts[1], d / "aux", value)
        r = write_recipe(d, {**yaml.safe_load(Path(w["recycle"]).read_text()),
                             "auxiliary": {"checkpoints": {"aux": str(bad)}}})
        cs.append(Case("nan", f"recycle:aux:{value}", cmd(w, "recycle", d / "out", r), "contains 1",
                       out=d / "out", inputs=[d]))
    for c, extra in (("adapt", ["--lr", "1e30", "--init", "1e30", "--clamp", "false", "--steps", "3"]),
                     ("concrete", ["--inner", "adamerging", "--tta-lr", "1e30", "--lam", "1e30", "--steps", "1",
                                   "--tta-steps", "3"])):
        d = case_dir()
        cs.append(Case("nan", f"{c}:diverges", cmd(w, c, d / "out", extra=extra), "non-finite", out=d / "out"))

    # ---------------------------------------------------------------- input: one line for every bad input
    for c in WRITERS + ("recycle",):
        d = case_dir()
        (d / "r.yaml").write_bytes(bytes(range(256)) * 8)
        cs.append(Case("input", f"{c}:binary_recipe", cmd(w, c, d / "out", d / "r.yaml"), "not a text file",
                       out=d / "out", inputs=[d]))
        d = case_dir()
        r = write_recipe(d, "base_model: !!python/object/apply:os.system ['touch /tmp/mergelab_pwned']\nmodels: []\n")
        cs.append(Case("input", f"{c}:python_tag_yaml", cmd(w, c, d / "out", r), "invalid YAML", out=d / "out",
                       inputs=[d]))
        d = case_dir()
        r = write_recipe(d, "models: [\n  - model: x\n")
        cs.append(Case("input", f"{c}:broken_yaml", cmd(w, c, d / "out", r), "invalid YAML", out=d / "out"))
        d = case_dir()
        r = write_recipe(d, "- just\n- a list\n")
        cs.append(Case("input", f"{c}:yaml_list", cmd(w, c, d / "out", r), "must be a YAML mapping", out=d / "out"))
        cs.append(Case("input", f"{c}:missing_recipe", cmd(w, c, d / "out", d / "nope.yaml"), "not found",
                       out=d / "out"))
    for c in WRITERS:
        for dev in ("tpu9", "cuda:banana", "cpu:3", ""):
            d = case_dir()
            cs.append(Case("input", f"{c}:device={dev!r}", cmd(w, c, d / "out", extra=["--device", dev]),
                           "unknown device", out=d / "out"))
    # shard indexes and headers, through merge and smile
    for c in ("merge", "smile"):
        for k, wm, expect in (("list", ["model.safetensors"], "weight_map"), ("int_values", {"x": 1}, "weight_map"),
                              ("empty", {}, "weight_map"), ("outside", "../outside.safetensors", "plain file name"),
                              ("absolute", "/etc/passwd", "plain file name"), ("missing", "gone.safetensors", "missing"),
                              ("not_json", None, "not a valid shard index")):
            d = case_dir()
            f = d / "ft"
            shutil.copytree(fts[0], f)
            (f / "model.safetensors").rename(d / "outside.safetensors")
            if isinstance(wm, str):
                from mergelab.io import open_checkpoint
                with open_checkpoint(fts[0]) as ck:
                    wm = {k2: wm for k2 in ck.keys()}
            (f / "model.safetensors.index.json").write_text("{nope" if wm is None else json.dumps({"weight_map": wm}))
            content = recipe_for(c)
            content["models"][0] = {"model": str(f)}
            r = write_recipe(d, content)
            cs.append(Case("input", f"{c}:index_{k}", cmd(w, c, d / "out", r), expect, out=d / "out", inputs=[d]))
        headers = {
            "negative_shape": ({"w": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]}}, 16, "non-negative"),
            "overlap": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, 24, "overlap"),
            "past_end": ({"a": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}, 16, "outside the file"),
            "bad_dtype": ({"a": {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]}}, 16, "unknown dtype"),
            "float_shape": ({"a": {"dtype": "F32", "shape": [4.5], "data_offsets": [0, 16]}}, 16, "shape must be"),
            "bool_offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [False, True]}}, 16, "data_offsets"),
            "extra_field": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], "x": 1}}, 16, "exactly"),
            "metadata_list": ({"__metadata__": [1]}, 0, "__metadata__"),
            "not_object": ([1, 2], 0, "not a JSON object"),
            "garbage": (b"\xff\xfe\x00garbage", 0, "corrupt safetensors header"),
            "duplicate_key": (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", '
                              b'"shape": [1], "data_offsets": [4, 8]}}', 8, "appears twice"),
            "huge_length": (None, 0, "exceeds the file size"),
        }
        for k, (hdr, size, expect) in headers.items():
            d = case_dir()
            f = d / "m.safetensors"
            if hdr is None:
                f.write_bytes(struct.pack("<Q", 10**12) + b"{}")
            else:
                raw_safetensors(f, hdr, b"\0" * size)
            content = recipe_for(c)
            content["models"][0] = {"model": str(f)}
            if c == "merge" and k in ("negative_shape",):
                content = {"merge_method": "average", "models": [{"model": str(f)}, {"model": str(f)}]}
            r = write_recipe(d, content)
            cs.append(Case("input", f"{c}:header_{k}", cmd(w, c, d / "out", r), expect, out=d / "out", inputs=[d]))
    # adapter configs
    for k, conf, expect in (("list", "[1, 2]", "must be a JSON object"), ("alpha_abc", {"r": 4, "lora_alpha": "abc"},
                                                                          "lora_alpha"),
                            ("alpha_nan", '{"r": 4, "lora_alpha": NaN}', "lora_alpha"),
                            ("r0", {"r": 0, "lora_alpha": 8}, "r must be a positive integer"),
                            ("r8", {"r": 8, "lora_alpha": 8}, "the config says r=8"),
                            ("r_str", {"r": "4"}, "r must be a positive integer"),
                            ("bad_json", "{nope", "invalid JSON"), ("fifo_str", {"r": 4, "fan_in_fan_out": "yes"},
                                                                   "fan_in_fan_out"),
                            ("bad_regex", {"r": 4, "alpha_pattern": {"(": 2}}, "regular expression"),
                            ("dora", {"r": 4, "use_dora": True}, "DoRA")):
        d = case_dir()
        a = adapter(d / "a", 5, config=conf if isinstance(conf, str) else {"peft_type": "LORA", **conf})
        r = write_recipe(d, {**recipe_for("lora-merge"), "models": [{"model": str(a)}, {"model": str(adapters[1])}]})
        cs.append(Case("input", f"lora-merge:config_{k}", cmd(w, "lora-merge", d / "out", r), expect, out=d / "out",
                       inputs=[d]))
    # data files of adapt
    for k, fname, content, expect in (("inputs_latin1", "t0/inputs.txt", b"caf\xe9\n", "not UTF-8"),
                                      ("tasks_binary", "tasks.txt", b"\xff\xfe\x00t0\n", "not UTF-8"),
                                      ("val_latin1", "t1/val.tsv", b"0\tcaf\xe9\n", "not UTF-8"),
                                      ("val_bad_label", "t1/val.tsv", b"x\tw1\n", "integer label"),
                                      ("val_label_range", "t1/val.tsv", b"7\tw1\n", "outside 0..1"),
                                      ("inputs_empty", "t0/inputs.txt", b"\n\n", "no texts"),
                                      ("head_1d", "t0/head.safetensors", None, "2-D"),
                                      ("head_garbage", "t0/head.safetensors", b"garbage", "not a readable"),
                                      ("tasks_count", "tasks.txt", b"t0\n", "task folders for 2 models")):
        import torch
        from safetensors.torch import save_file
        d = case_dir()
        dd = d / "data"
        shutil.copytree(data, dd)
        if content is None:
            save_file({"weight": torch.zeros(32)}, str(dd / fname))
        else:
            (dd / fname).write_bytes(content)
        argv = cmd(w, "adapt", d / "out")
        argv[argv.index("--data") + 1] = str(dd)
        cs.append(Case("input", f"adapt:data_{k}", argv, expect, out=d / "out", inputs=[d]))
    # option values (argparse: one line plus "see --help")
    opts = [("merge", ["--threads", "0"]), ("merge", ["--threads", "-3"]), ("merge", ["--threads", "two"]),
            ("merge", ["--shard-size", "abc"]), ("merge", ["--compat", "nope"]),
            ("lora-merge", ["--threads", "0"]), ("lora-merge", ["--rank", "0"]), ("lora-merge", ["--rank", "-2"]),
            ("smile", ["--k", "0"]), ("smile", ["--k", "-5"]), ("smile", ["--gate-k", "0"]), ("smile", ["--top-k", "0"]),
            ("smile", ["--top-k", "5"]), ("smile", ["--svd", "magic"]),
            ("adapt", ["--lr", "nan"]), ("adapt", ["--lr", "-1"]), ("adapt", ["--lr", "inf"]), ("adapt", ["--lr", "0"]),
            ("adapt", ["--init", "inf"]), ("adapt", ["--init", "nan"]), ("adapt", ["--steps", "-1"]),
            ("adapt", ["--batch-size", "0"]), ("adapt", ["--threads", "0"]), ("adapt", ["--ties-trim", "2"]),
            ("adapt", ["--clamp", "maybe"]), ("adapt", ["--granularity", "atom"]),
            ("concrete", ["--temperature", "0"]), ("concrete", ["--tta-lr", "nan"]), ("concrete", ["--lam", "inf"])]
    for c, extra in opts:
        d = case_dir()
        cs.append(Case("input", f"{c}:{' '.join(extra)}", cmd(w, c, d / "out", extra=extra), "", out=d / "out"))
    for extra in (["--threads", "0"], ["--threads", "-3"], ["--methods", "nonexistent_method"]):
        d = case_dir()
        cs.append(Case("input", f"bench:{' '.join(extra)}", ["bench", "--suite", "demo", "--out", str(d / "o"),
                                                            *extra], "", out=d / "o"))
    # recipe values
    for c in ("merge", "lora-merge"):
        for k, content, expect in (("shard_size_list", {"shard_size": [1]}, "shard_size"),
                                   ("shard_size_bool", {"shard_size": True}, "shard_size"),
                                   ("dtype_int", {"dtype": 5}, "dtype"), ("out_dtype_bad", {"out_dtype": "int4"}, "dtype"),
                                   ("method_list", {"merge_method": ["ties"]}, "merge_method"),
                                   ("method_unknown", {"merge_method": "tiez"}, "tiez"),
                                   ("param_str", {"parameters": {"density": "lots"}}, "density"),
                                   ("param_nan", {"parameters": {"density": float("nan")}}, "density"),
                                   ("param_range", {"parameters": {"density": 7}}, "density"),
                                   ("models_str", {"models": "all"}, "'models' must be"),
                                   ("compat_bad", {"compat": "both"}, "compat")):
            d = case_dir()
            r = write_recipe(d, {**recipe_for(c), **content})
            cs.append(Case("input", f"{c}:recipe_{k}", cmd(w, c, d / "out", r), expect, out=d / "out"))
    # hostile files: pickles that run code, remote code in configs
    for c in ("merge", "smile", "adapt"):
        d = case_dir()
        evil = d / "evil"
        evil.mkdir()
        shutil.copy(base / "config.json", evil / "config.json")
        shutil.copy(base / "vocab.txt", evil / "vocab.txt")

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {d / 'pwned'}",))
        (evil / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload()}))
        content = recipe_for(c)
        content["base_model"] = str(evil)
        r = write_recipe(d, content)
        cs.append(Case("input", f"{c}:malicious_bin_base", cmd(w, c, d / "out", r), "refused", out=d / "out",
                       inputs=[d]))
    d = case_dir()
    remote = d / "remote"
    shutil.copytree(fts[0], remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(cfg))
    (remote / "evil.py").write_text(f"import os\nos.system('touch {d / 'pwned'}')\n")
    content = recipe_for("adapt")
    content["models"][0] = {"model": str(remote)}
    r = write_recipe(d, content)
    cs.append(Case("input", "adapt:auto_map_remote_code", cmd(w, "adapt", d / "out", r), "", out=d / "out",
                   inputs=[remote, r], code=-1))     # -1: any exit code is fine, as long as no code ran (checked below)

    # ---------------------------------------------------------------- silent: mistakes that used to pass
    for c in WRITERS + ("concrete", "recycle"):
        d = case_dir()
        content = (yaml.safe_load(Path(w["recycle"]).read_text()) if c == "recycle"
                   else recipe_for("adapt" if c == "concrete" else c))
        content["paramters" if c != "recycle" else "hparam"] = {"density": 0.1}
        r = write_recipe(d, content)
        cs.append(Case("silent", f"{c}:typo_top_level_key", cmd(w, c, d / "out", r), "did you mean", out=d / "out"))
    for c in WRITERS:
        d = case_dir()
        content = recipe_for(c)
        content["models"].append({"model": str(d / "not_there")})
        r = write_recipe(d, content)
        cs.append(Case("silent", f"{c}:missing_model_path", cmd(w, c, d / "out", r), "no such file or folder",
                       out=d / "out"))
        d = case_dir()
        content = recipe_for(c)
        content["models"][0]["paramters"] = {"weight": 1}
        r = write_recipe(d, content)
        cs.append(Case("silent", f"{c}:typo_model_key", cmd(w, c, d / "out", r), "did you mean 'parameters'",
                       out=d / "out"))
    for k, src, expect in (("missing", "/nonexistent/tok", "no such file or folder"), ("union", "union", "not supported"),
                           ("file", str(root / "afile"), "not a folder"), ("number", 5, "tokenizer_source")):
        d = case_dir()
        r = write_recipe(d, recipe_for("merge", tokenizer_source=src))
        cs.append(Case("silent", f"merge:tokenizer_source_{k}", cmd(w, "merge", d / "out", r), expect, out=d / "out"))
    from transformers import BertConfig, BertModel
    d = case_dir()
    other = d / "other"
    BertModel(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                         vocab_size=100, max_position_embeddings=32)).save_pretrained(other)
    for c in ("merge", "smile", "adapt"):
        dd = case_dir()
        content = recipe_for(c)
        content["models"][0] = {"model": str(other)}
        r = write_recipe(dd, content)
        cs.append(Case("silent", f"{c}:finetune_of_another_architecture", cmd(w, c, dd / "out", r), "",
                       out=dd / "out", inputs=[other]))
    d = case_dir()
    r = write_recipe(d, recipe_for("smile", parameters={"top_k": 3}))
    cs.append(Case("silent", "smile:top_k_gt_experts_recipe", cmd(w, "smile", d / "out", r), "more than the 2 experts",
                   out=d / "out"))
    d = case_dir()
    r = write_recipe(d, recipe_for("smile", parameters={"top_k": 1, "banana": 2}))
    cs.append(Case("silent", "smile:unknown_parameter", cmd(w, "smile", d / "out", r), "banana", out=d / "out"))
    d = case_dir()
    r = write_recipe(d, recipe_for("adapt", parameters={"batch_sise": 2}))
    cs.append(Case("silent", "adapt:unknown_parameter", cmd(w, "adapt", d / "out", r), "batch_sise", out=d / "out"))
    d = case_dir()
    r = write_recipe(d, {**yaml.safe_load(Path(w["recycle"]).read_text()), "data": str(d / "gone.json")})
    cs.append(Case("silent", "recycle:missing_data", cmd(w, "recycle", d / "out", r), "no such file", out=d / "out"))

    # ---------------------------------------------------------------- env: full disk, read-only, file size limit
    for c in WRITERS:
        for k in ("enospc", "erofs", "efbig"):
            d = case_dir()
            cs.append(Case("env", f"{c}:{k}", cmd(w, c, d / "mnt" / "deep" / "out"), "", out=d / "mnt" / "deep" / "out",
                           run=env_case(k, small=c == "lora-merge"), needs_root=k != "efbig"))

    # ---------------------------------------------------------------- signals and races on a larger merge
    big = build_big(scratch / "big")
    for sig in ("SIGTERM", "SIGHUP", "SIGINT"):
        for delay in (0.0, 0.15, 0.4):
            d = case_dir()
            cs.append(Case("signal", f"merge:{sig}:+{delay}s", ["merge", str(big), str(d / "new" / "out"), "--quiet",
                                                               "--threads", "1"],
                           "interrupted", out=d / "new" / "out", run=signal_case(sig, delay)))
    for i in range(3):
        d = case_dir()
        cs.append(Case("signal", f"merge:two_runs_at_once#{i}", ["merge", str(big), str(d / "out"), "--quiet"],
                       "", out=d / "out", run=race_case))
    d = case_dir()
    cs.append(Case("signal", "merge:stale_temp_of_dead_process", cmd(w, "merge", d / "out"), "", out=d / "out",
                   run=stale_case))

    # ---------------------------------------------------------------- cli: argparse, pipes, --version
    for argv, expect in ((["merge"], "required"), (["merge", "a"], "required"), (["merge", "a", "b", "--bogus"],
                                                                                "unrecognized"),
                         (["upscale"], "required"), (["upscale", "smile"], "required"), (["adapt"], "required"),
                         (["adapt", "adamerging", "r", "o"], "--data"), (["lora-merge", "r", "o"], "--rank"),
                         (["nonsense"], "invalid choice"), ([], "required"), (["methods", "--compat", "x"],
                                                                             "invalid choice"),
                         (["recycle"], "required"), (["bench", "--suite"], "expected one argument")):
        cs.append(Case("cli", f"argparse:{' '.join(argv) or '(none)'}", argv, expect, run=argparse_case))
    cs.append(Case("cli", "methods|closed pipe", ["methods"], "", run=pipe_case))
    cs.append(Case("cli", "--version", ["--version"], "", run=version_case))
    return cs


def _demo_task() -> str:
    from mergelab.bench import suite
    return suite.get_suite("demo").tasks[0]


def build_big(folder: Path) -> Path:
    """Base + 2 fine-tunes of 4 x [1024, 2048] float32 (32 MB each): a merge long enough to interrupt."""
    import torch
    import yaml
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    names = [f"layer{i}.weight" for i in range(4)]
    base = {n: torch.randn(1024, 2048, generator=g) for n in names}
    folder.mkdir(parents=True)
    paths = []
    for i in range(3):
        sd = base if i == 0 else {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()}
        p = folder / f"m{i}"
        p.mkdir()
        save_file(sd, str(p / "model.safetensors"))
        paths.append(p)
    r = folder / "big.yaml"
    r.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(paths[0]),
                                 "models": [{"model": str(p)} for p in paths[1:]],
                                 "parameters": {"density": 0.3}}))
    return r


# ------------------------------------------------------------------------------------------- runners

def _popen(case: Case, **kw):
    return subprocess.Popen([sys.executable, "-m", "mergelab", *case.argv], env={**ENV, **case.env},
                            cwd=case.cwd or REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def one_line(err: str, expect: str, problems: list[str], prefix: str = "mergelab: error:") -> None:
    lines = err.strip().splitlines()
    if "Traceback" in err:
        problems.append("traceback: " + err.strip().splitlines()[-1][:200])
    elif len(lines) != 1:
        problems.append(f"{len(lines)} stderr lines: {err.strip()[:300]!r}")
    elif not lines[0].startswith(prefix):
        problems.append(f"stderr does not start with {prefix!r}: {lines[0][:200]!r}")
    elif expect and expect not in lines[0]:
        problems.append(f"expected {expect!r} in: {lines[0][:300]!r}")


def env_case(kind: str, small: bool = False):
    """A 64 KiB tmpfs (4 KiB for the tiny LoRA outputs), made read-only for erofs; a file size limit for efbig."""
    def run(case: Case) -> list[str]:
        mnt = case.out.parent.parent
        mnt.mkdir(parents=True)
        mounted = False
        try:
            if kind in ("enospc", "erofs"):
                subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={'4k' if small else '64k'}", "tmpfs", str(mnt)],
                               check=True)
                mounted = True
                if kind == "erofs":
                    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
            preexec = None
            if kind == "efbig":
                def preexec():
                    import resource
                    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                    lim = 512 if small else 32 << 10
                    resource.setrlimit(resource.RLIMIT_FSIZE, (lim, lim))
            p = _popen(case, preexec_fn=preexec)
            _, err = p.communicate(timeout=600)
            problems = []
            if p.returncode != 2:
                problems.append(f"exit code {p.returncode}")
            one_line(err, {"enospc": "No space left", "erofs": "read-only", "efbig": "File too large"}[kind], problems)
            left = [str(x) for x in mnt.rglob("*")]
            if left:
                problems.append(f"left in the folder: {left[:3]}")
            return problems
        finally:
            if mounted:
                subprocess.run(["umount", str(mnt)], check=False)
    return run


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)    # a background shell starts children with SIGINT ignored


def signal_case(sig: str, delay: float):
    def run(case: Case) -> list[str]:
        p = _popen(case, preexec_fn=_default_sigint)
        parent = case.out.parent
        t0 = time.time()
        while time.time() - t0 < 300 and p.poll() is None:
            if parent.exists() and any(".tmp-" in x.name for x in parent.iterdir()):
                break
            time.sleep(0.005)
        time.sleep(delay)
        finished_first = p.poll() is not None
        if not finished_first:
            p.send_signal(getattr(signal, sig))
        _, err = p.communicate(timeout=300)
        problems = []
        if finished_first:
            return ["finished before the signal: increase the model size"] if p.returncode != 0 else ["(not signalled)"]
        want = 128 + getattr(signal, sig)
        if p.returncode != want:
            problems.append(f"exit code {p.returncode}, expected {want}")
        one_line(err, "", problems, prefix=f"mergelab: interrupted")
        if case.out.parent.parent.exists() and any(case.out.parent.parent.iterdir()):
            problems.append(f"left: {[x.name for x in case.out.parent.parent.rglob('*')][:4]}")
        return problems
    return run


def race_case(case: Case) -> list[str]:
    ps = [_popen(case) for _ in range(2)]
    res = [p.communicate(timeout=600) for p in ps]
    codes = sorted(p.returncode for p in ps)
    problems = []
    if codes != [0, 2]:
        problems.append(f"exit codes {codes}, expected one 0 and one 2")
    for p, (_, err) in zip(ps, res):
        if p.returncode == 2:
            one_line(err, "", problems)
            if not ("another mergelab run" in err or "already exists" in err):
                problems.append(f"unexpected error {err.strip()[:200]!r}")
    from mergelab.io import open_checkpoint
    try:
        with open_checkpoint(case.out) as ck:
            ck.get(ck.keys()[0])
    except Exception as e:  # noqa: BLE001 - any failure to read the result is a finding
        problems.append(f"output unreadable: {e}")
    return problems


def stale_case(case: Case) -> list[str]:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = case.out.parent / f".{case.out.name}.tmp-{dead.pid}-zz"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)
    p = _popen(case)
    _, err = p.communicate(timeout=600)
    problems = [] if p.returncode == 0 else [f"exit code {p.returncode}: {err.strip()[:200]}"]
    if stale.exists():
        problems.append("stale temporary folder of a dead process not removed")
    return problems


def argparse_case(case: Case) -> list[str]:
    p = _popen(case)
    _, err = p.communicate(timeout=120)
    problems = [] if p.returncode == 2 else [f"exit code {p.returncode}"]
    one_line(err, case.expect, problems, prefix="mergelab")
    if "usage:" in err:
        problems.append("usage block printed")
    if "--help" not in err:
        problems.append("no 'see --help'")
    return problems


def pipe_case(case: Case) -> list[str]:
    r, wfd = os.pipe()
    os.close(r)
    p = subprocess.run([sys.executable, "-m", "mergelab", *case.argv], env=ENV, stdout=wfd, stderr=subprocess.PIPE,
                       text=True, timeout=120)
    os.close(wfd)
    return [f"stderr: {p.stderr.strip()[:200]!r}"] if p.stderr.strip() else []


def version_case(case: Case) -> list[str]:
    p = subprocess.run([sys.executable, "-m", "mergelab", *case.argv], env=ENV, capture_output=True, text=True,
                       timeout=120)
    return [] if p.returncode == 0 and p.stdout.startswith("mergelab ") else [f"{p.returncode}: {p.stdout}{p.stderr}"]


def run_case(case: Case, world_paths: list[Path]) -> list[str]:
    watched = [*world_paths, *case.inputs]
    before = tree_hash(watched)
    out_before = tree_hash([case.out]) if case.out is not None and case.existed else None
    if case.run is not None:
        problems = case.run(case)
    else:
        p = _popen(case)
        try:
            _, err = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            p.kill()
            return ["timed out"]
        problems = []
        if case.code != -1:
            if p.returncode != case.code:
                problems.append(f"exit code {p.returncode}: {err.strip()[-300:]!r}")
            one_line(err, case.expect, problems, prefix="mergelab" if not case.expect else "mergelab: error:")
        elif "Traceback" in err:
            problems.append("traceback: " + err.strip().splitlines()[-1][:200])
        if case.out is not None:
            if case.existed:
                if tree_hash([case.out]) != out_before:
                    problems.append("existing OUT_DIR changed")
            elif case.out.exists() and p.returncode != 0:
                problems.append("OUT_DIR created by a failed run")
    if tree_hash(watched) != before:
        problems.append("AN INPUT CHANGED")
    for d in [*(case.inputs or []), *( [case.out.parent] if case.out is not None and case.out.parent.is_dir() else [])]:
        if Path(d).is_dir():
            left = leftovers(Path(d))
            if left:
                problems.append(f"leftovers: {left[:3]}")
    for pwned in Path(case.cwd or REPO).glob("pwned"):
        problems.append(f"CODE RAN: {pwned}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", default=None, help="run only these classes, comma-separated (out_dir, nan, input, silent, env, signal, cli)")
    ap.add_argument("--keep", default=None, help="build the world here and keep it")
    args = ap.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="mergelab-hostile-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    world = build_world(root / "world")
    scratch = root / "cases"
    scratch.mkdir()
    all_cases = cases(world, scratch)
    if args.only:
        all_cases = [c for c in all_cases if c.cls in args.only.split(",")]
    is_root = os.geteuid() == 0
    skipped = [c for c in all_cases if c.needs_root and not is_root]
    todo = [c for c in all_cases if c not in skipped]
    world_paths = [root / "world"]
    print(f"{len(todo)} cases ({len(skipped)} skipped, need root), world built in {time.time() - t0:.0f} s",
          flush=True)
    results: dict[str, list[str]] = {}
    # signal and race cases time themselves: run them alone, the rest on a pool
    timed = [c for c in todo if c.cls in ("signal", "env")]
    pooled = [c for c in todo if c not in timed]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for c, problems in zip(pooled, pool.map(lambda c: run_case(c, world_paths), pooled)):
            results[f"{c.cls}/{c.name}"] = problems
            if problems:
                print(f"FAIL {c.cls}/{c.name}: {'; '.join(problems)}", flush=True)
    for c in timed:
        problems = run_case(c, world_paths)
        results[f"{c.cls}/{c.name}"] = problems
        if problems:
            print(f"FAIL {c.cls}/{c.name}: {'; '.join(problems)}", flush=True)
    for pwned in (Path("/tmp/mergelab_pwned"), *scratch.rglob("pwned")):
        if pwned.exists():
            print(f"FAIL code execution: {pwned} exists")
            results["code-execution"] = ["pwned"]
    by_class: dict[str, Counter] = defaultdict(Counter)
    for c in todo:
        by_class[c.cls]["ok" if not results[f"{c.cls}/{c.name}"] else "failed"] += 1
    print(f"\n| class | cases | passed | failed |\n|---|---|---|---|")
    for cls in ("out_dir", "nan", "input", "silent", "env", "signal", "cli"):
        k = by_class.get(cls)
        if k:
            print(f"| {cls} | {k['ok'] + k['failed']} | {k['ok']} | {k['failed']} |")
    total_failed = sum(1 for v in results.values() if v)
    print(f"| total | {len(todo)} | {len(todo) - total_failed} | {total_failed} |")
    print(f"\n{time.time() - t0:.0f} s; world and cases in {root}" + ("" if args.keep else " (removed)"))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if total_failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
