"""Bad input, hostile input and a hostile environment, for every command that writes.

Each class of failure ends as one line on stderr and exit code 2 (signals: 128 + the signal), never a
traceback, never a changed input, never a partial output or a temporary folder left behind, never a
mistake accepted in silence. Real tiny checkpoints, real adapters, real subprocesses for signals and
resource limits; ``hypothesis`` fuzzes safetensors headers, recipes and adapter configs.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from mergelab.cli import main
from mergelab.errors import MergelabError
from tests.helpers import make_model_folders

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
QUERY = "encoder.layer.0.attention.self.query"


# ------------------------------------------------------------------------------------------ world

def tree_hash(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def make_adapter(folder: Path, seed: int, rank: int = 4, **config) -> Path:
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"base_model.model.{QUERY}.lora_A.weight": torch.randn(rank, 32, generator=g) * 0.1,
               f"base_model.model.{QUERY}.lora_B.weight": torch.randn(32, rank, generator=g) * 0.1},
              str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["query"], **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


class World:
    def __init__(self, root: Path):
        self.root = root
        self.base, self.fts = make_model_folders(root / "models", n=2)
        self.adapters = [make_adapter(root / "adapters" / f"a{i}", i) for i in (1, 2)]
        self.data = root / "data"
        g = torch.Generator().manual_seed(0)
        for t in ("t0", "t1"):
            d = self.data / t
            d.mkdir(parents=True)
            (d / "inputs.txt").write_text("w1 w2 w3\nw4 w5\nw6 w7 w8 w9\nw10\n")
            save_file({"weight": torch.randn(2, 32, generator=g), "bias": torch.zeros(2)}, str(d / "head.safetensors"))
        (self.data / "tasks.txt").write_text("t0\nt1\n")
        self.recipes = root / "recipes"
        self.recipes.mkdir()
        self.merge = self.recipe("merge", {"merge_method": "task_arithmetic", "base_model": str(self.base),
                                           "models": [{"model": str(m)} for m in self.fts]})
        self.lora = self.recipe("lora", {"merge_method": "task_arithmetic", "base_model": str(self.base),
                                         "models": [{"model": str(a)} for a in self.adapters]})
        self.smile = self.recipe("smile", {"base_model": str(self.base), "models": [{"model": str(m)} for m in self.fts]})
        self.adapt = self.recipe("adapt", {"base_model": str(self.base), "models": [{"model": str(m)} for m in self.fts],
                                           "parameters": {"batch_size": 2, "max_length": 8}})
        (root / "afile").write_text("a file, not a folder")
        self.outs = root / "outs"
        self.outs.mkdir()

    def recipe(self, name: str, content: dict) -> Path:
        p = self.recipes / f"{name}.yaml"
        p.write_text(yaml.safe_dump(content))
        return p

    def inputs_hash(self) -> dict[str, str]:
        return tree_hash(self.root / "models", self.root / "adapters", self.data, self.recipes, self.root / "afile")

    def command(self, name: str, recipe: Path | None, out) -> list[str]:
        r = str(recipe or getattr(self, name.replace("-", "_").replace("lora_merge", "lora")))
        return {"merge": ["merge", r, str(out), "--quiet"],
                "lora-merge": ["lora-merge", r, str(out), "--rank", "4", "--quiet"],
                "smile": ["upscale", "smile", r, str(out), "--k", "4", "--gate-k", "2", "--quiet"],
                "adapt": ["adapt", "adamerging", r, str(out), "--data", str(self.data), "--steps", "1", "--quiet"],
                }[name]


COMMANDS = ("merge", "lora-merge", "smile", "adapt")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("hostile"))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if ".tmp-" in p.name or ".old-" in p.name
                  or p.name.endswith(".lock"))


def refused(capsys, world: World, argv, pattern: str, out: Path | None = None, existed: bool = False):
    """Exit code 2, one line naming the cause, inputs unchanged, nothing written."""
    before = world.inputs_hash()
    capsys.readouterr()                     # what the test's own set-up printed
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("mergelab: error:") and "Traceback" not in err, err
    assert pattern in err, err
    assert world.inputs_hash() == before
    if out is not None and str(out).strip():
        out = Path(out)
        if not existed:
            assert not out.exists() or out.is_symlink(), err
        if out.parent.is_dir():
            assert not leftovers(out.parent), leftovers(out.parent)
    return err


# ------------------------------------------------------------------- 1. OUT_DIR safety for every command

OUT_CASES = ["base", "finetune", "models_folder", "inside_input", "empty", "dot", "cwd_parent", "symlink_to_input",
             "foreign_folder", "home", "parent_is_file", "data_folder"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", OUT_CASES)
def test_out_dir_never_replaces_inputs_or_user_folders(world, capsys, monkeypatch, tmp_path, command, case):
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("user data")
    monkeypatch.chdir(work)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    existed = True
    if case == "base":
        out, pattern = world.base, "is an input"
    elif case == "finetune":
        out, pattern = world.fts[0], "is an input"
        if command == "lora-merge":
            out = world.adapters[0]
    elif case == "models_folder":
        out, pattern = world.root / "models", "contains an input"
        if command == "lora-merge":
            out = world.root / "adapters"
    elif case == "inside_input":
        out, pattern, existed = world.base / "sub", "lies inside an input", False
    elif case == "empty":
        out, pattern = "", "OUT_DIR is empty"
    elif case == "dot":
        out, pattern = ".", "is the working directory"
    elif case == "cwd_parent":
        out, pattern = "..", "contains the working directory"
    elif case == "symlink_to_input":
        out = tmp_path / "link"
        out.symlink_to(world.fts[0] if command != "lora-merge" else world.adapters[0])
        pattern = "symbolic link"
    elif case == "foreign_folder":
        out = tmp_path / "mine"
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
        pattern = "not written by mergelab"
    elif case == "home":
        out, pattern = home, "the home folder"
    elif case == "parent_is_file":
        out, pattern, existed = world.root / "afile" / "out", "is a file", False
    else:
        if command != "adapt":
            pytest.skip("only adapt reads a --data folder")
        out, pattern = world.data, "is an input"
    refused(capsys, world, world.command(command, None, out) + ["--force"], pattern, out, existed=existed)
    assert (work / "precious.txt").read_text() == "user data"
    if case == "foreign_folder":
        assert (out / "thesis.tex").read_text() == "years of work"


def test_force_replaces_only_mergelab_outputs_and_modes_are_ordinary(world, capsys):
    out = world.outs / "replaced"
    assert main(world.command("merge", None, out)) == 0
    assert (out / ".mergelab-output").is_file()
    mask = os.umask(0)
    os.umask(mask)
    for p in out.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p
    refused(capsys, world, world.command("merge", None, out), "already exists (use --force", out, existed=True)
    assert main(world.command("merge", None, out) + ["--force"]) == 0
    assert not leftovers(world.outs)


# ------------------------------------------------------------------------ 2. NaN / Inf in every command

def _poisoned_copy(src: Path, dest: Path, name: str, value: float) -> Path:
    import shutil
    shutil.copytree(src, dest)
    f = dest / "model.safetensors"
    from mergelab.io import load_state_dict
    sd = load_state_dict(f)
    sd[name].view(-1)[3] = value
    save_file(sd, str(f))
    return dest


def test_nan_and_inf_inputs_are_named(world, capsys, tmp_path):
    name = "encoder.layer.1.output.dense.weight"
    nan_ft = _poisoned_copy(world.fts[0], tmp_path / "nan_ft", name, float("nan"))
    inf_base = _poisoned_copy(world.base, tmp_path / "inf_base", name, float("inf"))
    models = [{"model": str(nan_ft)}, {"model": str(world.fts[1])}]
    smile = world.recipe("smile_nan", {"base_model": str(world.base), "models": models})
    out = world.outs / "nan"
    refused(capsys, world, world.command("smile", smile, out), f"{name!r} contains 1 NaN", out)
    smile_inf = world.recipe("smile_inf", {"base_model": str(inf_base), "models": [{"model": str(m)} for m in world.fts]})
    refused(capsys, world, world.command("smile", smile_inf, out), f"{name!r} contains 1 Inf", out)
    adapt = world.recipe("adapt_nan", {"base_model": str(world.base), "models": models})
    refused(capsys, world, world.command("adapt", adapt, out), "contains 1 NaN", out)
    # a NaN head in the --data folder
    import shutil
    data = tmp_path / "data"
    shutil.copytree(world.data, data)
    save_file({"weight": torch.full((2, 32), float("nan")), "bias": torch.zeros(2)}, str(data / "t1" / "head.safetensors"))
    argv = world.command("adapt", None, out)
    argv[argv.index("--data") + 1] = str(data)
    refused(capsys, world, argv, "head.safetensors: tensor 'weight' contains 64 NaN", out)
    # lora-merge: a NaN in an adapter
    bad = make_adapter(tmp_path / "nan_adapter", 7)
    sd = {k: v.clone() for k, v in __import__("safetensors.torch", fromlist=["x"]).load_file(
        str(bad / "adapter_model.safetensors")).items()}
    sd[f"base_model.model.{QUERY}.lora_B.weight"][0, 0] = float("nan")
    save_file(sd, str(bad / "adapter_model.safetensors"))
    lora = world.recipe("lora_nan", {"merge_method": "task_arithmetic", "base_model": str(world.base),
                                     "models": [{"model": str(bad)}, {"model": str(world.adapters[1])}]})
    refused(capsys, world, world.command("lora-merge", lora, out), "NaN", out)


def test_adapt_stops_when_training_diverges(world, capsys):
    out = world.outs / "diverged"
    argv = world.command("adapt", None, out) + ["--lr", "1e30", "--clamp", "false", "--init", "1e30",
                                                 "--steps", "3", "--granularity", "task"]
    refused(capsys, world, argv, "non-finite", out)


def test_recycle_refuses_a_nan_auxiliary_checkpoint(world, tmp_path):
    from mergelab.recycle.config import load_config
    from mergelab.recycle.pipeline import run_recycle
    from tests.test_recycle import make_bundle
    bad = _poisoned_copy(world.fts[0], tmp_path / "aux_nan", "embeddings.word_embeddings.weight", float("nan"))
    (tmp_path / "data.json").write_text(json.dumps(make_bundle()))
    cfg = load_config({"base_model": str(world.base), "data": str(tmp_path / "data.json"), "executor": "local",
                       "auxiliary": {"checkpoints": {"bad": str(bad)}}})
    with pytest.raises(MergelabError, match="embeddings.word_embeddings.weight' contains 1 NaN"):
        run_recycle(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


# ----------------------------------------------------- 3. environment and input failures: one line each

def test_binary_recipe_and_bad_devices_and_option_values(world, capsys, tmp_path):
    binary = tmp_path / "recipe.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    out = world.outs / "x"
    for command in COMMANDS:
        refused(capsys, world, world.command(command, binary, out), "not a text file", out)
        refused(capsys, world, world.command(command, None, out) + ["--device", "tpu9"], "unknown device", out)
    for argv in (world.command("merge", None, out) + ["--threads", "0"],
                 world.command("merge", None, out) + ["--threads", "-3"],
                 world.command("lora-merge", None, out) + ["--threads", "0"],
                 ["lora-merge", world.lora, out, "--rank", "0"],
                 world.command("adapt", None, out) + ["--lr", "nan"],
                 world.command("adapt", None, out) + ["--lr", "-1"],
                 world.command("adapt", None, out) + ["--init", "inf"],
                 world.command("adapt", None, out) + ["--threads", "0"],
                 ["bench", "--threads", "-3"],
                 ["merge", world.merge],                   # missing OUT_DIR
                 ["merge", world.merge, out, "--bogus"]):
        code = None
        try:
            main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and "see 'mergelab" in err and "usage:" not in err, (argv, err)
        assert not out.exists()
    recipe = world.recipe("adapt_lr", {"base_model": str(world.base), "models": [{"model": str(m)} for m in world.fts],
                                       "parameters": {"lr": float("nan")}})
    refused(capsys, world, world.command("adapt", recipe, out), "lr must be a finite number", out)


def test_strict_shard_index_and_headers(world, capsys, tmp_path):
    import shutil
    out = world.outs / "x"
    cases = {"list": ["model.safetensors"], "non_string": {"a": 1}, "outside": None, "empty": {}}
    ft = world.fts[0]
    (tmp_path / "outside.safetensors").write_bytes((ft / "model.safetensors").read_bytes())
    for case, weight_map in cases.items():
        folder = tmp_path / f"idx_{case}"
        shutil.copytree(ft, folder)
        (folder / "model.safetensors").unlink()
        if case == "outside":
            from mergelab.io import open_checkpoint
            with open_checkpoint(ft) as ck:
                weight_map = {k: "../outside.safetensors" for k in ck.keys()}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        r = world.recipe(f"idx_{case}", {"merge_method": "task_arithmetic", "base_model": str(world.base),
                                          "models": [{"model": str(folder)}, {"model": str(world.fts[1])}]})
        pattern = "plain file name" if case == "outside" else "weight_map"
        refused(capsys, world, world.command("merge", r, out), pattern, out)

    def header_file(name, header, data_len):
        raw = json.dumps(header).encode()
        p = tmp_path / name
        p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_len)
        return p
    neg = header_file("neg.safetensors", {"w": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]}}, 16)
    overlap = header_file("overlap.safetensors", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                                  "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, 24)
    for f, pattern in ((neg, "non-negative"), (overlap, "overlap")):
        r = world.recipe(f"hdr_{f.stem}", {"merge_method": "average", "models": [{"model": str(f)}, {"model": str(f)}]})
        refused(capsys, world, world.command("merge", r, out), pattern, out)


def test_adapter_configs_and_ranks(world, capsys, tmp_path):
    out = world.outs / "x"
    cases = {"list": ("[1, 2]", "must be a JSON object"), "alpha": ('{"r": 4, "lora_alpha": "abc"}', "lora_alpha"),
             "r0": ('{"r": 0, "lora_alpha": 8}', "r must be a positive integer"),
             "r8": ('{"r": 8, "lora_alpha": 8}', "the config says r=8, its tensors have rank 4")}
    for case, (text, pattern) in cases.items():
        a = make_adapter(tmp_path / case, 3)
        (a / "adapter_config.json").write_text(text)
        r = world.recipe(f"lora_{case}", {"merge_method": "task_arithmetic", "base_model": str(world.base),
                                          "models": [{"model": str(a)}, {"model": str(world.adapters[1])}]})
        refused(capsys, world, world.command("lora-merge", r, out), pattern, out)


def test_recipe_mistakes_are_not_accepted(world, capsys, tmp_path):
    out = world.outs / "x"
    models = [{"model": str(m)} for m in world.fts]
    for command in ("merge", "smile", "adapt"):
        r = world.recipe(f"typo_{command}", {"base_model": str(world.base), "models": models,
                                             "paramters": {"k": 1},
                                             **({"merge_method": "ties"} if command == "merge" else {})})
        refused(capsys, world, world.command(command, r, out), "unknown key 'paramters' (did you mean 'parameters'?)",
                out)
        r = world.recipe(f"missing_{command}", {"base_model": str(world.base),
                                                "models": [*models, {"model": str(tmp_path / "gone")}],
                                                **({"merge_method": "ties"} if command == "merge" else {})})
        refused(capsys, world, world.command(command, r, out), "gone: no such file or folder", out)
    r = world.recipe("tok", {"merge_method": "ties", "base_model": str(world.base), "models": models,
                             "tokenizer_source": str(tmp_path / "no_tokenizer")})
    refused(capsys, world, world.command("merge", r, out), "tokenizer_source: ", out)


def test_smile_checks_structure_and_top_k(world, capsys, tmp_path):
    out = world.outs / "x"
    from transformers import BertConfig, BertModel
    other = tmp_path / "other"
    BertModel(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                         vocab_size=100, max_position_embeddings=32)).save_pretrained(other)
    r = world.recipe("smile_mismatch", {"base_model": str(world.base),
                                        "models": [{"model": str(other)}, {"model": str(world.fts[1])}]})
    refused(capsys, world, world.command("smile", r, out), "inputs do not match", out)
    refused(capsys, world, world.command("smile", None, out) + ["--top-k", "5"], "more than the 2 experts", out)
    refused(capsys, world, world.command("smile", None, out) + ["--k", "0"], "k must be a positive rank", out)


def test_smile_refuses_a_malicious_bin_base(world, capsys, tmp_path):
    import shutil
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(world.base / "config.json", evil / "config.json")
    proof = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {proof}",))
    (evil / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload()}))
    r = world.recipe("smile_evil", {"base_model": str(evil), "models": [{"model": str(m)} for m in world.fts]})
    refused(capsys, world, world.command("smile", r, world.outs / "x"), "refused", world.outs / "x")
    assert not proof.exists()


def test_non_utf8_data_files(world, capsys, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(world.data, data)
    (data / "t0" / "inputs.txt").write_bytes(b"w1 w2\n\xff\xfe broken\n")
    argv = world.command("adapt", None, world.outs / "x")
    argv[argv.index("--data") + 1] = str(data)
    refused(capsys, world, argv, "inputs.txt:2: not UTF-8", world.outs / "x")


def test_legacy_bin_loads(world, tmp_path):
    from mergelab.io import load_state_dict, open_checkpoint
    sd = load_state_dict(world.fts[0])
    torch.save(sd, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    with open_checkpoint(tmp_path / "old.bin") as ck:
        assert set(ck.keys()) == set(sd) and torch.equal(ck.get(QUERY + ".weight"), sd[QUERY + ".weight"])


def _run(code: str, *args, timeout=120, **kw):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=timeout, **kw)


def test_disk_full_is_one_line_and_leaves_nothing(world, tmp_path):
    """A file size limit (EFBIG, as a full disk gives ENOSPC) hit while the output is written."""
    out = tmp_path / "deep" / "out"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
    before = world.inputs_hash()
    p = subprocess.run([sys.executable, "-m", "mergelab", *world.command("merge", None, out)], env=ENV,
                       capture_output=True, text=True, timeout=120, preexec_fn=limit)
    err = p.stderr.strip()
    assert p.returncode == 2 and err.count("\n") == 0 and "File too large" in err, err
    assert not (tmp_path / "deep").exists()            # the parent folders this run created are gone too
    assert world.inputs_hash() == before


# ------------------------------------------------------------------ 5. signals, stale temporaries, races

SELF_SIGNAL = """
import os, signal, sys
from mergelab.io.writer import ShardedWriter
from mergelab.cli import main
real = ShardedWriter.write
for sig in ("SIGTERM", "SIGHUP"):
    sent = []
    def write(*a, **k):      # a real signal, in the middle of the merge (torch engine or torch-free lane)
        if not sent:
            sent.append(sig)
            os.kill(os.getpid(), getattr(signal, sig))
        return real(*a, **k)
    ShardedWriter.write = write
    print(main(sys.argv[1:]), flush=True)
"""


def test_sigterm_and_sighup_clean_up_like_ctrl_c(world, tmp_path):
    out = tmp_path / "new" / "out"
    p = _run(SELF_SIGNAL, *world.command("merge", None, out))
    assert p.stdout.split() == [str(128 + signal.SIGTERM), str(128 + signal.SIGHUP)], p.stderr
    assert p.stderr.splitlines() == ["mergelab: interrupted (SIGTERM)", "mergelab: interrupted (SIGHUP)"], p.stderr
    assert not (tmp_path / "new").exists()              # no temp folder, no lock, no created parent


def test_stale_temporaries_of_dead_processes_are_removed(world, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "out"
    stale = tmp_path / f".out.tmp-{dead.pid}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    alive = tmp_path / f".other.tmp-{os.getpid()}-abc"
    alive.mkdir()
    assert main(world.command("merge", None, out)) == 0
    assert not stale.exists() and alive.exists()


def test_second_run_into_a_claimed_out_dir_fails_at_once(world, capsys, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from mergelab.io import claim_output\n"
                               "with claim_output(sys.argv[1]):\n print('held', flush=True); sys.stdin.read()",
                               str(out)], env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for command in COMMANDS:
            refused(capsys, world, world.command(command, None, out), f"another mergelab run (pid {holder.pid})", None)
            assert not out.exists()
    finally:
        holder.communicate("", timeout=30)
    assert main(world.command("merge", None, out)) == 0


# ------------------------------------------------------------------ 6. one line, quiet pipes, flags everywhere

def test_third_party_output_never_precedes_the_error(world, tmp_path):
    """SMILE and adapt load models with transformers before they fail: stderr is still one line."""
    from transformers import BertConfig, BertForSequenceClassification
    cls = tmp_path / "cls"      # a classification fine-tune: AutoModel reports unexpected/missing keys
    m = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=64, vocab_size=100, max_position_embeddings=32))
    m.save_pretrained(cls)
    r = world.recipe("adapt_cls", {"base_model": str(world.base), "models": [{"model": str(cls)},
                                                                              {"model": str(world.fts[1])}],
                                   "parameters": {"batch_size": 2, "max_length": 8, "steps": 1, "lr": 1e30,
                                                  "init": 1e30, "clamp": False}})
    argvs = [world.command("adapt", r, tmp_path / "o1"),
             world.command("smile", None, tmp_path / "o2") + ["--target", "no_such_layer"]]
    code = ("import json, os, sys\nfrom mergelab.cli import main\n"
            "for argv in json.loads(sys.argv[1]):\n"
            "    rc = main(argv)\n    sys.stderr.flush()\n    os.write(2, f'=== {rc}\\n'.encode())\n")
    p = _run(code, json.dumps([[str(a) for a in argv] for argv in argvs]), timeout=300)
    lines = p.stderr.splitlines()
    assert len(lines) == 4 and lines[1] == lines[3] == "=== 2", p.stderr
    assert lines[0].startswith("mergelab: error: ") and "non-finite" in lines[0], p.stderr
    assert lines[2].startswith("mergelab: error: ") and "no_such_layer" in lines[2], p.stderr


def test_closed_pipe_version_and_quiet(world, capsys, tmp_path):
    r, w = os.pipe()
    os.close(r)                                       # `mergelab methods | head` once head has exited
    p = subprocess.run([sys.executable, "-m", "mergelab", "methods"], env=ENV, stdout=w, stderr=subprocess.PIPE,
                       text=True, timeout=60)
    os.close(w)
    assert "Traceback" not in p.stderr and p.stderr.strip() == "", p.stderr
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("mergelab ")
    # adapt accepts --quiet like every command; off a terminal no bar is drawn; outputs are 0644
    out = world.outs / "adapted"
    assert main(world.command("adapt", None, out)) == 0
    argv = [a for a in world.command("adapt", None, world.outs / "adapted2") if a != "--quiet"]
    assert main(argv) == 0
    assert "\r" not in capsys.readouterr().err
    mask = os.umask(0)
    os.umask(mask)
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f


def test_bench_cache_and_recycle_store_files_are_readable_by_others(world, tmp_path):
    from transformers import AutoTokenizer, BertModel
    from mergelab.bench.runner import save_finetuned
    from mergelab.recycle.store import RunStore
    mask = os.umask(0o022)
    try:
        save_finetuned(tmp_path / "cache" / "ft", BertModel.from_pretrained(world.base),
                       AutoTokenizer.from_pretrained(world.base), torch.nn.Linear(32, 2), {"task": "x"})
        RunStore(tmp_path / "runs").save("r1", {"w": torch.ones(2)}, {"spec": {}})
    finally:
        os.umask(mask)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and all(p.stat().st_mode & 0o777 == 0o644 for p in files), \
        [(p.name, oct(p.stat().st_mode)) for p in files]


# ------------------------------------------------------------------ property-based fuzzing

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
from hypothesis import HealthCheck, given, settings  # noqa: E402

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                      st.text(max_size=8))
json_value = st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                                         st.dictionaries(st.text(max_size=6), c, max_size=4)),
                          max_leaves=12)
entry = st.fixed_dictionaries({"dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "X9"]),
                                                  json_value),
                               "shape": st.one_of(st.lists(st.integers(-3, 5), max_size=3), json_value),
                               "data_offsets": st.one_of(st.lists(st.integers(-8, 120), min_size=2, max_size=2),
                                                         json_value)})
ITEM = {"F32": 4, "F16": 2, "I64": 8, "BOOL": 1}


@st.composite
def consistent_entry(draw):
    """An entry whose byte range has the size its (possibly negative) shape multiplies out to."""
    dtype = draw(st.sampled_from(sorted(ITEM)))
    shape = draw(st.lists(st.integers(-3, 4), max_size=3))
    numel = 1
    for d in shape:
        numel *= d
    begin = draw(st.integers(0, 16))
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + abs(numel) * ITEM[dtype]]}


header = st.one_of(st.dictionaries(st.text(max_size=6), st.one_of(entry, consistent_entry(), json_value), max_size=4),
                   st.dictionaries(st.text(min_size=1, max_size=3), consistent_entry(), min_size=1, max_size=3),
                   json_value)


@FUZZ
@given(header=header, data_len=st.integers(0, 128), garbage=st.binary(max_size=16), as_bytes=st.booleans())
def test_fuzz_safetensors_headers_end_in_mergelab_errors(tmp_path_factory, header, data_len, garbage, as_bytes):
    from mergelab.io import SafetensorsFile
    path = tmp_path_factory.mktemp("fz") / "f.safetensors"
    raw = garbage if as_bytes else json.dumps(header, allow_nan=True).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(range(256))[:data_len] * 1)
    try:
        f = SafetensorsFile(path)
    except MergelabError:
        return
    try:
        for name, info in f.infos.items():
            assert tuple(f.get(name).shape) == info.shape
    finally:
        f.close()


recipe_keys = st.sampled_from(["base_model", "models", "merge_method", "parameters", "dtype", "out_dtype",
                               "tokenizer_source", "compat", "shard_size", "paramters", "slices", "name"])


fuzz_value = st.one_of(json_value, st.sampled_from(["PATH", "PATH2", "MISSING"]),
                       st.lists(st.fixed_dictionaries({"model": st.sampled_from(["PATH", "PATH2", "MISSING"])}),
                                max_size=3),
                       st.sampled_from(["ties", "average", "task_arithmetic", "dare_ties", "base", "union"]))
valid_start = st.fixed_dictionaries({"base_model": st.just("PATH"), "models": st.just([{"model": "PATH2"}]),
                                     "merge_method": st.sampled_from(["ties", "average", "task_arithmetic"])})


@FUZZ
@given(start=st.one_of(st.just({}), valid_start), raw=st.dictionaries(recipe_keys, fuzz_value, max_size=4))
def test_fuzz_recipes_end_in_mergelab_errors(tmp_path_factory, start, raw):
    from mergelab.engine.recipe import load_recipe
    top = tmp_path_factory.getbasetemp()
    paths = {"PATH": top / "fuzz_a", "PATH2": top / "fuzz_b", "MISSING": top / "fuzz_missing"}
    for k in ("PATH", "PATH2"):
        paths[k].mkdir(exist_ok=True)
    raw = {**start, **raw}

    def fill(v):
        if isinstance(v, str) and v in paths:
            return str(paths[v])
        if isinstance(v, list):
            return [fill(x) for x in v]
        if isinstance(v, dict):
            return {k: fill(x) for k, x in v.items()}
        return v
    try:
        recipe = load_recipe({k: fill(v) for k, v in raw.items()})
    except MergelabError:
        return
    # accepted: then nothing was silently ignored
    assert set(raw) <= {"base_model", "models", "merge_method", "parameters", "dtype", "out_dtype",
                        "tokenizer_source", "compat", "shard_size", "name"}, raw
    assert all(Path(p).exists() for p in recipe.input_paths()), raw


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=100).map(lambda b: b.decode("latin-1")),
                      json_value.map(lambda v: yaml.safe_dump(v))))
def test_fuzz_recipe_files_end_in_mergelab_errors(tmp_path_factory, text):
    from mergelab.engine.recipe import load_recipe
    p = tmp_path_factory.mktemp("rf") / "r.yaml"
    p.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        load_recipe(p)
    except MergelabError:
        pass


adapter_config = st.one_of(json_value, st.fixed_dictionaries(
    {"r": st.one_of(st.integers(-2, 9), json_value), "lora_alpha": st.one_of(st.floats(), json_value)},
    optional={"fan_in_fan_out": json_value, "use_rslora": json_value, "alpha_pattern": json_value,
              "rank_pattern": json_value, "peft_type": st.one_of(st.just("LORA"), json_value)}))


@FUZZ
@given(config=adapter_config)
def test_fuzz_adapter_configs_end_in_mergelab_errors(world, tmp_path_factory, config):
    from mergelab.io import open_checkpoint
    from mergelab.io.lora import load_adapter
    d = make_adapter(tmp_path_factory.mktemp("ac"), 3)
    (d / "adapter_config.json").write_text(json.dumps(config))
    with open_checkpoint(world.base) as base:
        try:
            ad = load_adapter(d, base)
        except MergelabError:
            return
        try:    # accepted: the rank it reads is the tensors' rank and the scaling is a finite number
            lm = next(iter(ad.modules.values()))
            assert lm.scaling == lm.scaling and abs(lm.scaling) != float("inf")
            assert config.get("r") in (None, 4)
        finally:
            ad.weights.close()
