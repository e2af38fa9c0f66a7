"""Every command and snippet of README.md and docs/*.md runs as documented (issue 21: "docs that drift").

The documented paths (``recipe.yaml``, ``OUT_DIR``, ``path/to/base``, ``adapters/task_a``, ``DATA``,
``/models/minilm``...) are created in a temporary folder with tiny real models (a 2-layer BERT, its
fine-tunes, PEFT adapters, a --data folder), and each fenced code block is run there:

* shell blocks: every command through ``mergelab.cli.main`` (the real CLI, in this process);
* command synopses (``mergelab x ... [--flag X]``) and inline commands: parsed by the real argument
  parser, brackets opened, so every documented flag must exist;
* Python blocks: executed with the variables they assume (state dicts, modules, loaders);
* YAML recipes: the command that documents them runs them, or they are validated by their loader.

Long documented numbers are replaced by small ones where a command would otherwise train for
minutes (``--steps 2``, ``steps=2``); each replacement is asserted, so a changed doc fails here.
Blocks that cannot run on a test machine are in SKIP with the reason. A block of a doc that this
file does not know is a failure: a new snippet needs a line here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from tests.helpers import make_model_folders

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- reading the docs
def code_blocks(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    out = []
    for i, m in enumerate(re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)):
        body = m.group(2)
        first = next((ln.strip() for ln in body.splitlines() if ln.strip()), "")
        out.append({"file": path.name, "index": i, "lang": m.group(1), "body": body, "first": first})
    return out


def inline_commands(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    spans = [re.sub(r"\s+", " ", m.group(1)) for m in re.finditer(r"`([^`]+)`", text)]
    return [s for s in spans if re.match(r"(PYTHONPATH=\S+ )?(mergelab( |$)|python |\S*python3? |make )", s)]


def inline_api_names(path: Path) -> list[str]:
    """Dotted names of the API the prose cites (``mergelab.kernels.svd.robust_svd``, ``...load_smile(OUT_DIR)``)."""
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return [m.group(1) for m in re.finditer(r"`(mergelab(?:\.\w+)+)[^`]*`", text)]


ALL_BLOCKS = [b for d in DOCS for b in code_blocks(d)]


def block_id(b):
    return f"{b['file']}:{b['index']}"


def commands(body: str) -> list[str]:
    """Shell lines without comments; indented lines continue the previous command (synopses)."""
    out: list[str] = []
    for raw in body.splitlines():
        line = re.sub(r"\s+#.*$", "", raw.rstrip()) if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        if raw[:1].isspace() and out:
            out[-1] += " " + line.strip()
        else:
            out.append(line.strip())
    return out


# ---------------------------------------------------------------- the world the docs assume
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import BertModel, BertTokenizer

    root = tmp_path_factory.mktemp("docs_world")
    base, fts = make_model_folders(root / "m", n=3, scale=0.02)
    BertTokenizer(vocab_file=str(base / "vocab.txt")).save_pretrained(base)
    links = {"base": base, "finetune_math": fts[0], "finetune_code": fts[1],
             "path/to/base": base, "path/to/finetune_a": fts[0], "path/to/finetune_b": fts[1],
             "path/to/finetune_c": fts[2], "models/minilm": base, "models/minilm-fortune-topic": fts[0],
             "models/minilm-foldoc": fts[1]}
    for name, target in links.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(target)
    for i, name in enumerate(("task_a", "task_b")):            # two rank-8 PEFT adapters on query/value
        torch.manual_seed(10 + i)
        model = get_peft_model(BertModel.from_pretrained(base), LoraConfig(r=8, lora_alpha=16,
                                                                             target_modules=["query", "value"]))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(0.05 * torch.randn(p.shape))
        model.save_pretrained(root / "adapters" / name)
    # the --data layout of docs/adapt.md
    words = [f"w{i}" for i in range(95)]
    g = torch.Generator().manual_seed(0)
    data = root / "DATA"
    for t, task in enumerate(("fortune_topic", "foldoc")):
        d = data / task
        d.mkdir(parents=True)
        lines = [" ".join(words[int(j)] for j in torch.randint(0, 95, (5,), generator=g)) for _ in range(12)]
        (d / "inputs.txt").write_text("\n".join(lines) + "\n")
        save_file({"weight": 0.3 * torch.randn(2, 32, generator=g), "bias": torch.zeros(2)},
                  str(d / "head.safetensors"))
        (d / "val.tsv").write_text("".join(f"{k % 2}\t{ln}\n" for k, ln in enumerate(lines[:4])))
    (data / "tasks.txt").write_text("fortune_topic\nfoldoc\n")
    (root / "DATA_DIR").symlink_to(data)
    # a tiny recycle target (pre-tokenized bundle), as in tests/test_recycle.py
    from tests.test_recycle import make_bundle
    import json
    (root / "recycle").mkdir()
    (root / "recycle" / "data.json").write_text(json.dumps(make_bundle()))
    (root / "recycle" / "recipe.yaml").write_text(yaml.safe_dump({
        "base_model": str(base), "data": str(root / "recycle" / "data.json"),
        "auxiliary": {"tasks": ["other"], "hparams": {"steps": 2, "batch_size": 8, "lr": 1e-3}},
        "runs": 2, "fusing_runs": 0, "lp_steps": 1, "probe_iters": 10, "num_cpus": 1, "cpus_per_run": 1,
        "executor": "local", "hparams": {"lr": [1e-3], "steps": 2, "batch_size": 8, "eval_every": 2}}))
    return SimpleNamespace(root=root, base=base, fts=fts)


def fresh_cwd(world, tmp_path: Path) -> Path:
    """A folder holding the documented relative paths (links into the world) and nothing else."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for name in ("base", "finetune_math", "finetune_code", "path", "adapters", "models", "DATA", "DATA_DIR"):
        (cwd / name).symlink_to(world.root / name)
    return cwd


def doc_yaml(file: str, first: str, world) -> str:
    """The text of a documented YAML block, absolute example paths moved into the world."""
    block = next(b for b in ALL_BLOCKS if b["file"] == file and b["lang"] == "yaml" and b["first"].startswith(first))
    return block["body"].replace("/models/", f"{world.root}/models/")


def run_cli(argv: list[str], cwd: Path, capsys) -> str:
    from mergelab.cli import main

    old = os.getcwd()
    os.chdir(cwd)
    try:
        rc = main(argv)
    finally:
        os.chdir(old)
    out, err = capsys.readouterr()
    assert rc == 0, f"mergelab {' '.join(argv)} -> {rc}\n{err}"
    return out


def parse_only(cmd: str) -> None:
    """The real parser accepts the documented command (synopsis brackets opened, first alternative)."""
    from mergelab.cli import build_parser

    text = re.sub(r"\s\.\.\.", "", cmd.replace("[", " ").replace("]", " "))
    argv = [tok.split("|")[0] for tok in shlex.split(text)]
    placeholders = {"K": "4", "G": "2", "T": "1", "N": "1", "W": "1", "PATTERN": "query", "ADDR": "auto", "E": "0.05",
                    "DIR": "d", "R": "4"}
    argv = [placeholders.get(a, a) for a in argv]
    assert argv[0] == "mergelab", cmd
    if len(argv) == 2 and argv[1] in {"merge", "adapt", "bench", "recycle", "methods", "lora-merge", "upscale",
                                      "demo", "moe", "search", "emr"}:
        argv.append("--help")                      # a bare command name in prose: it must exist
    try:
        build_parser().parse_args(argv[1:])
    except SystemExit as e:
        assert e.code == 0, f"the parser refuses the documented command: {cmd}"


def substitute(text: str, pairs: list[tuple[str, str]]) -> str:
    for old, new in pairs:
        assert old in text, f"the docs changed: {old!r} is no longer there (update tests/test_docs.py)"
        text = text.replace(old, new)
    return text


# ---------------------------------------------------------------- the handlers, one per block
def _merge(cwd, capsys, recipe_text, *extra):
    (cwd / "recipe.yaml").write_text(recipe_text)
    out = run_cli(["merge", "recipe.yaml", "OUT_DIR", "--quiet", *extra], cwd, capsys)
    assert (cwd / "OUT_DIR" / "model.safetensors").is_file() and "merged" in out
    return out


def readme_merge_commands(block, world, cwd, capsys):
    lines = commands(block["body"])
    assert lines == ["mergelab merge recipe.yaml OUT_DIR", "mergelab methods", "mergelab methods --compat paper"]
    _merge(cwd, capsys, doc_yaml("README.md", "base_model: ./base", world))
    from transformers import AutoModel
    AutoModel.from_pretrained(cwd / "OUT_DIR")                 # "transformers.AutoModel.from_pretrained(OUT_DIR)"
    assert not (cwd / "OUT_DIR" / "model.safetensors.index.json").exists()   # one file below --shard-size
    assert "normalize" in run_cli(["methods"], cwd, capsys)
    assert "normalize" in run_cli(["methods", "--compat", "paper"], cwd, capsys)


def readme_recipe(block, world, cwd, capsys):
    from mergelab.engine.recipe import load_recipe
    (cwd / "recipe.yaml").write_text(block["body"])
    r = load_recipe(cwd / "recipe.yaml")
    assert r.method == "ties" and len(r.models) == 2           # run by the README's merge command


def readme_python(block, world, cwd, capsys):
    (cwd / "recipe.yaml").write_text(doc_yaml("README.md", "base_model: ./base", world))
    _exec(block["body"], cwd, state_dicts(world))
    assert (cwd / "OUT_DIR" / "mergelab_recipe.yaml").is_file()


def readme_smile(block, world, cwd, capsys):
    (cwd / "recipe.yaml").write_text(doc_yaml("smile.md", "base_model: path/to/base", world))
    [cmd] = commands(block["body"])
    out = run_cli(shlex.split(cmd)[1:] + ["--quiet"], cwd, capsys)
    assert "SMILE: upscaled" in out
    from mergelab.upscale.smile import load_smile
    load_smile(cwd / "OUT_DIR")


def readme_adapt(block, world, cwd, capsys):
    (cwd / "recipe.yaml").write_text(doc_yaml("adapt.md", "base_model: /models/minilm", world))
    lines = commands(block["body"])
    assert len(lines) == 2
    for i, cmd in enumerate(lines):     # 500 / 2000 documented steps -> 2 (and 2 test-time steps)
        argv = [a.replace("OUT_DIR", f"OUT_DIR{i}") for a in shlex.split(cmd)[1:]] + ["--steps", "2"]
        if "--inner" in argv:
            argv += ["--tta-steps", "2"]
        out = run_cli(argv, cwd, capsys)
        assert "entropy" in out and (cwd / f"OUT_DIR{i}" / "model.safetensors").is_file()


def readme_recycle(block, world, cwd, capsys):
    [cmd] = commands(block["body"])
    assert cmd == "mergelab recycle examples/recycle_text.yaml OUT_DIR --executor ray"
    from mergelab.recycle import load_config
    cfg = load_config(REPO / "examples" / "recycle_text.yaml")  # the documented recipe is valid ...
    assert cfg.base_model == "minilm"
    # ... but trains MiniLM on the Debian corpora for about an hour: the same command on the tiny bundle
    # target, with the local executor (Ray's runtime takes longer to start than this run; Ray is tested
    # in tests/test_recycle.py)
    out = run_cli(["recycle", str(world.root / "recycle" / "recipe.yaml"), "OUT_DIR", "--executor", "local",
                   "--quiet"], cwd, capsys)
    assert "| Ratatouille | greedy |" in out and (cwd / "OUT_DIR" / "model" / "head.safetensors").is_file()


def readme_vs_mergekit(block, world, cwd, capsys):
    [cmd] = commands(block["body"])
    # --size 1gb writes 4 GB of checkpoints and installs mergekit: the tiny size, mergelab only
    cmd = substitute(cmd, [("--size 1gb", "--size tiny --models 2 --tools mergelab --no-install "
                                          "--methods task_arithmetic --threads 1 --workdir " + str(cwd / "vs"))])
    env_part, python, script, *args = shlex.split(cmd)
    assert env_part == "PYTHONPATH=src" and python == ".venv/bin/python"
    p = subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "task_arithmetic" in p.stdout


def architecture_python(block, world, cwd, capsys):
    (cwd / "recipe.yaml").write_text(doc_yaml("README.md", "base_model: ./base", world))
    ns = _exec(block["body"], cwd, state_dicts(world))
    assert set(ns["merged"]) == set(ns["base_sd"])


def adapt_synopsis(block, world, cwd, capsys):
    for cmd in commands(block["body"]):
        parse_only(cmd)


def adapt_recipe(block, world, cwd, capsys):
    from mergelab.cli.adapt import _read_recipe
    (cwd / "recipe.yaml").write_text(doc_yaml("adapt.md", "base_model: /models/minilm", world))
    base, models, params = _read_recipe(str(cwd / "recipe.yaml"))   # run by the README's adapt commands
    assert Path(base).is_dir() and all(Path(m).is_dir() for m in models) and params["steps"] == 100


def adapt_layout(block, world, cwd, capsys):
    for line in block["body"].splitlines():                 # the world's DATA folder follows this layout
        path = line.split()[0]
        assert (cwd / path).exists(), path
    assert (cwd / "DATA" / "tasks.txt").read_text().split() == ["fortune_topic", "foldoc"]


def adapt_python(block, world, cwd, capsys):
    from torch import nn
    from transformers import BertModel, BertTokenizer

    from mergelab.adapt.text import PooledEncoder, ShuffledBatches, prefixed, tokenize
    tok = BertTokenizer.from_pretrained(world.base)
    model = PooledEncoder(BertModel.from_pretrained(world.base, attn_implementation="eager"))
    sds = [prefixed(BertModel.from_pretrained(p).state_dict()) for p in world.fts[:2]]
    seqs = tokenize(tok, ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"], 16)
    loaders = [ShuffledBatches(seqs, 2, s) for s in (0, 1)]
    heads = [nn.Linear(32, 2), nn.Linear(32, 3)]
    env = {"model": model, "base_sd": dict(model.state_dict()), "sd_a": sds[0], "sd_b": sds[1],
           "loader_a": loaders[0], "loader_b": loaders[1], "head_a": heads[0], "head_b": heads[1],
           "loaders": loaders, "heads": heads, "folder": str(cwd / "side")}
    (cwd / "side").mkdir()
    body = substitute(block["body"], [("steps=500", "steps=2"), ("steps=1000, tta_steps=1000", "steps=2, tta_steps=2")])
    ns = _exec(body, cwd, env)
    assert ns["res"].mask is not None and (cwd / "side" / "adapt_result.json").is_file()


def adapt_databased_recipe(block, world, cwd, capsys):
    from mergelab.cli.adapt import _read_recipe
    (cwd / "databased.yaml").write_text(doc_yaml("adapt.md", "# databased.yaml", world))
    base, models, params = _read_recipe(str(cwd / "databased.yaml"))   # run by the commands block below
    assert Path(base).is_dir() and len(models) == 2 and params == {"batch_size": 16, "max_length": 64}


def _databased_commands() -> list[str]:
    block = next(b for b in ALL_BLOCKS if b["file"] == "adapt.md" and b["first"].startswith("mergelab adapt regmean "))
    return commands(block["body"])


def _run_databased(cmd: str, world, cwd, capsys) -> str:
    """One documented data-based command, WEMoE's 1000 steps -> 2 (every other documented value runs as is)."""
    if not (cwd / "databased.yaml").exists():
        (cwd / "databased.yaml").write_text(doc_yaml("adapt.md", "# databased.yaml", world))
    if " wemoe " in cmd:
        cmd = substitute(cmd, [("--steps 1000", "--steps 2")])
    return run_cli(shlex.split(cmd)[1:], cwd, capsys)


def adapt_databased_commands(block, world, cwd, capsys):
    lines = commands(block["body"])
    assert [ln.split()[2] for ln in lines] == ["regmean", "regmean++", "fisher", "fisher", "wemoe"]
    for cmd in lines:
        out_dir = cwd / shlex.split(cmd)[4]
        printed = _run_databased(cmd, world, cwd, capsys)
        assert f"wrote {out_dir}" in printed
        if " wemoe " in cmd:
            assert (out_dir / "wemoe_config.json").is_file() and "x the base" in printed
        else:
            from transformers import AutoModel
            AutoModel.from_pretrained(out_dir)     # a normal checkpoint


def adapt_wemoe_python(block, world, cwd, capsys):
    [cmd] = [c for c in _databased_commands() if " wemoe " in c]
    _run_databased(cmd, world, cwd, capsys)          # the OUT_wemoe the snippet loads
    ns = _exec(block["body"], cwd, {})
    assert tuple(ns["logits"].shape) == (2, 2)


def bench_commands(block, world, cwd, capsys):
    lines = commands(block["body"])
    ran = 0
    for cmd in lines:
        if cmd == "mergelab bench --list":
            assert "text6" in run_cli(["bench", "--list"], cwd, capsys)
            ran += 1
        elif cmd.startswith("scripts/install_data.sh"):
            assert (REPO / "scripts" / "install_data.sh").is_file()   # installs Debian packages: not run
        else:   # the benchmark itself: fine-tunes MiniLM on the corpora (minutes to an hour); parsed only
            assert cmd.startswith("mergelab bench --suite"), cmd
            parse_only(cmd)
    assert ran == 1


def bench_resume_commands(block, world, cwd, capsys):
    lines = commands(block["body"])   # fine-tunes MiniLM (an hour): parsed; --resume runs in test_bench_zeroshot
    assert len(lines) == 3 and any("--resume" in c for c in lines)
    for cmd in lines:
        parse_only(cmd.removesuffix("&").strip())


def bench_register(block, world, cwd, capsys):
    from mergelab.bench import data, suite
    (cwd / "my.tsv").write_text("a\tfirst text\nb\tsecond text\n")
    try:
        _exec(block["body"], cwd, {})
        rows = _exec("rows = data.TASKS['my_task'].read()", cwd, {"data": data})["rows"]   # opens my.tsv
        # (the example keeps each line's newline in the text; the benchmark's clean_text strips it)
        assert [(t.strip(), y) for t, y in rows] == [("first text", "a"), ("second text", "b")]
        assert suite.SUITES["mine"]().tasks == ["my_task", "gcide"]
    finally:
        data.TASKS.pop("my_task", None)
        suite.SUITES.pop("mine", None)


def bench_suite_yaml(block, world, cwd, capsys):
    from mergelab.bench import data, suite
    import copy
    (cwd / "my_suite.yaml").write_text(block["body"])
    saved = copy.deepcopy(data.TASKS)
    s = suite.load_suite_file(cwd / "my_suite.yaml")   # running it needs the corpora and the benchmark
    assert s.name == "my_suite" and s.tasks == ["gcide", "fortune_lang", "reviews", "tickets", "quotes"]
    assert [m.name for m in s.methods] == ["ties", "ta"]
    assert {"reviews", "tickets", "quotes", "fortune_lang"} <= set(s.task_specs)
    assert set(data.TASKS) == set(saved) and data.TASKS["fortune_lang"] == saved["fortune_lang"]   # nothing global


def bench_builder(block, world, cwd, capsys):
    from transformers import BertModel

    from mergelab.io import load_state_dict
    from mergelab.upscale.smile import SmileLinear
    # run_benchmark(text6) is the full benchmark (MiniLM, corpora): the builder runs on a tiny pool instead
    body = substitute(block["body"], [("result = runner.run_benchmark(s)", "pass")])
    ns = _exec(body, cwd, {})
    assert ns["s"].methods[-1].builder is ns["smile_row"]
    pool = SimpleNamespace(base=BertModel.from_pretrained(world.base),
                           finetuned={f"t{i}": load_state_dict(p) for i, p in enumerate(world.fts[:2])})
    model = ns["smile_row"](pool, SimpleNamespace(names=["t0", "t1"]), {"k": 4})
    assert any(isinstance(m, SmileLinear) for m in model.modules())


def recycle_synopsis(block, world, cwd, capsys):
    [cmd] = commands(block["body"])
    parse_only(cmd)


def recycle_recipe(block, world, cwd, capsys):
    from mergelab.recycle import load_config
    (cwd / "r.yaml").write_text(block["body"])
    cfg = load_config(cwd / "r.yaml")   # running it trains MiniLM on the corpora (about an hour): validated
    assert cfg.aux_tasks == ["wordnet_verb", "foldoc"] and cfg.runs == 6 and cfg.executor == "ray"


def smile_synopsis(block, world, cwd, capsys):
    [cmd] = commands(block["body"])
    parse_only(cmd)


def smile_recipe(block, world, cwd, capsys):
    (cwd / "recipe.yaml").write_text(doc_yaml("smile.md", "base_model: path/to/base", world))
    out = run_cli(["upscale", "smile", "recipe.yaml", "OUT_DIR", "--quiet"], cwd, capsys)
    # per layer: query, key, value and both *.output.dense ('*' matches dots, as the doc says), 2 layers
    assert "upscaled 10 Linear layers with 2 experts" in out


def smile_python(block, world, cwd, capsys):
    from transformers import BertModel
    fts = [BertModel.from_pretrained(p) for p in world.fts]
    env = {"base_model": BertModel.from_pretrained(world.base, attn_implementation="eager"),
           "ft_a": fts[0], "ft_b": fts[1], "ft_c": fts[2],
           "ids": torch.randint(5, 100, (2, 7)), "mask": torch.ones(2, 7, dtype=torch.long)}
    ns = _exec(block["body"], cwd, env)
    assert ns["out"].last_hidden_state.shape == (2, 7, 32)
    assert (cwd / "out" / "smile" / "vocab.txt").is_file()


def svd_recipe(block, world, cwd, capsys):
    out = _merge(cwd, capsys, block["body"])
    assert "tsv" in out


def svd_python(block, world, cwd, capsys):
    ns = _exec(block["body"], cwd, state_dicts(world))
    assert set(ns["merged"]) == set(ns["base_sd"])


def lora_full_model_recipe(block, world, cwd, capsys):
    _merge(cwd, capsys, block["body"])


def lora_adapter_recipe(block, world, cwd, capsys):
    from mergelab.engine.recipe import load_recipe
    (cwd / "recipe.yaml").write_text(block["body"])
    assert load_recipe(cwd / "recipe.yaml").method == "task_arithmetic"   # run by the lora-merge command


def lora_merge_command(block, world, cwd, capsys):
    [cmd] = commands(block["body"])
    parse_only(cmd)
    (cwd / "recipe.yaml").write_text(_lora_recipe_text())
    argv = shlex.split(re.sub(r"\[.*?\]", "", cmd))[1:]
    out = run_cli(argv + ["--quiet"], cwd, capsys)
    assert "at rank 16" in out and "overall" in out
    assert capsys.readouterr().err == ""                    # exact at rank 16: no truncation warning


def _lora_recipe_text() -> str:
    return next(b["body"] for b in ALL_BLOCKS if b["file"] == "svd_lora.md" and b["lang"] == "yaml"
                and "task_arithmetic" in b["body"])


def lora_experts_python(block, world, cwd, capsys):
    ns = _exec(block["body"], cwd, {})
    assert ns["gate"].shape == (2, 32) and ns["expert_A"].shape == (4, 32)


def readme_slices(block, world, cwd, capsys):
    from mergelab.engine.recipe import load_recipe
    (cwd / "a").symlink_to(world.fts[0])
    (cwd / "b").symlink_to(world.fts[1])
    (cwd / "recipe.yaml").write_text(block["body"])
    r = load_recipe(cwd / "recipe.yaml", validate=False)   # 24-32 layers: run on Llama stand-ins in test_recipes
    assert r.method == "passthrough" and [s.sources[0].layer_range for s in r.slices] == [(0, 24), (8, 32)]


def search_config(block, world, cwd, capsys):
    """A documented search file: checked by its loader (running one is tests/test_search.py's job)."""
    from mergelab.search.config import load_search_config
    (cwd / "recipe.yaml").write_text(doc_yaml("README.md", "base_model: ./base", world))
    for name in ("val_code.txt", "val_prose.txt"):
        (cwd / name).write_text("w1 w2 w3\n")
    body = block["body"]
    if "type: tasks" in body:   # the task pool needs the benchmark's cached fine-tunes and heads: swap it
        body = substitute(body, [("objective: {type: tasks, suite: demo}",
                                  "objective: {type: perplexity, files: {code: val_code.txt}}"),
                                 ("final_split: test", "")])
    (cwd / "search.yaml").write_text(body)
    cfg = load_search_config(cwd / "search.yaml")
    assert cfg is not None


def search_commands(block, world, cwd, capsys):
    for cmd in commands(block["body"]):
        parse_only(cmd)


def lines_recipe(block, world, cwd, capsys):
    """The LiNeS fragment of docs/leaderboard_methods.md, completed with the README's models, merges."""
    body = block["body"] + f"base_model: {world.base}\nmodels:\n" + "".join(f"  - model: {f}\n" for f in world.fts)
    out = _merge(cwd, capsys, body)
    assert "ties" in out


def moe_command(block, world, cwd, capsys):
    [cmd] = commands(block["body"])
    parse_only(cmd)                     # run for real on Llama stand-ins in tests/test_moe.py


def moe_config(block, world, cwd, capsys):
    from mergelab.upscale.moe import load_moe_config
    for name in ("ft_math", "ft_code"):
        (cwd / name).symlink_to(world.fts[0] if name == "ft_math" else world.fts[1])
    (cwd / "moe.yaml").write_text(block["body"])
    cfg = load_moe_config(cwd / "moe.yaml")     # validated; building needs Llama models (tests/test_moe.py)
    assert cfg.gate_mode == "hidden" and len(cfg.experts) == 2 and len(cfg.shared_experts) == 1
    assert cfg.experts[0].negative_prompts == ["Write a poem"] and cfg.dtype == "bfloat16"


# ---------------------------------------------------------------- helpers of the Python blocks
def state_dicts(world) -> dict:
    from mergelab.io import load_state_dict
    fts = [load_state_dict(p) for p in world.fts]
    return {"base_sd": load_state_dict(world.base), "sd_a": fts[0], "sd_b": fts[1], "sd_c": fts[2],
            "sd1": fts[0], "sd2": fts[1], "sd3": fts[2]}


def _exec(body: str, cwd: Path, env: dict) -> dict:
    ns = dict(env)
    old = os.getcwd()
    os.chdir(cwd)
    try:
        exec(compile(body, "<docs snippet>", "exec"), ns)
    finally:
        os.chdir(old)
    return ns


def skip(reason):
    def handler(block, world, cwd, capsys):
        pytest.skip(reason)
    handler.reason = reason
    return handler


# (file, start of the block's first line) -> handler. Every block of the docs must be here.
HANDLERS = {
    ("README.md", "make demo"): skip("make demo runs the benchmark (MiniLM fine-tunes on the Debian corpora) and "
                                     "make test runs this suite: both are what CI runs, not snippets"),
    ("README.md", "mergelab merge recipe.yaml OUT_DIR"): readme_merge_commands,
    ("README.md", "base_model: ./base"): readme_recipe,
    ("README.md", "import mergelab"): readme_python,
    ("README.md", "mergelab upscale smile recipe.yaml OUT_DIR"): readme_smile,
    ("README.md", "mergelab adapt adamerging recipe.yaml OUT_DIR"): readme_adapt,
    ("README.md", "mergelab recycle examples/recycle_text.yaml"): readme_recycle,
    ("README.md", "mergelab bench --suite demo"): skip("the benchmark: fine-tunes MiniLM on the Debian corpora "
                                                      "(minutes for demo, about an hour for text6); being rewritten"),
    ("README.md", "PYTHONPATH=src .venv/bin/python benchmarks/vs_mergekit.py"): readme_vs_mergekit,
    ("ARCHITECTURE.md", "cli/        one module per command"): skip("a diagram of the layers, not code"),
    ("ARCHITECTURE.md", "from mergelab import merge, merge_state_dicts"): architecture_python,
    ("adapt.md", "mergelab adapt adamerging recipe.yaml OUT_DIR --data DATA"): adapt_synopsis,
    ("adapt.md", "base_model: /models/minilm"): adapt_recipe,
    ("adapt.md", "DATA/tasks.txt"): adapt_layout,
    ("adapt.md", "from mergelab.adapt import adamerging"): adapt_python,
    ("adapt.md", "# databased.yaml"): adapt_databased_recipe,
    ("adapt.md", "mergelab adapt regmean databased.yaml"): adapt_databased_commands,
    ("adapt.md", "from transformers import AutoTokenizer"): adapt_wemoe_python,
    ("bench.md", "scripts/install_data.sh"): bench_commands,
    ("bench.md", "mergelab bench --suite text8 --seeds 0 --out runs/s0 &"): bench_resume_commands,
    ("bench.md", "from mergelab.bench import data, suite"): bench_register,
    ("bench.md", "name: my_suite"): bench_suite_yaml,
    ("bench.md", "from mergelab.bench import suite, runner"): bench_builder,
    ("recycle.md", "mergelab recycle recipe.yaml OUT_DIR"): recycle_synopsis,
    ("recycle.md", "base_model: minilm"): recycle_recipe,
    ("smile.md", "mergelab upscale smile recipe.yaml OUT_DIR [--k K]"): smile_synopsis,
    ("smile.md", "base_model: path/to/base"): smile_recipe,
    ("smile.md", "from mergelab.upscale.smile import"): smile_python,
    ("svd_lora.md", "base_model: path/to/base"): None,        # three recipes: told apart in _handler
    ("svd_lora.md", "import mergelab"): svd_python,
    ("svd_lora.md", "mergelab lora-merge recipe.yaml OUT_DIR --rank 16"): lora_merge_command,
    ("svd_lora.md", "from mergelab.io.lora import lora_experts"): lora_experts_python,
    ("README.md", "mergelab moe moe.yaml OUT_DIR"): moe_command,
    ("README.md", "slices:"): readme_slices,
    ("leaderboard_methods.md", "merge_method: ties"): lines_recipe,
    ("README.md", "# search.yaml"): search_config,
    ("README.md", "mergelab search search.yaml OUT_DIR"): search_commands,
    ("search.md", "mergelab search search.yaml OUT_DIR"): search_commands,
    ("search.md", "recipe: recipe.yaml"): search_config,
    ("moe.md", "mergelab moe moe.yaml OUT_DIR"): moe_command,
    ("moe.md", "base_model: ./base"): moe_config,
}


def _handler(block):
    keys = [k for k in HANDLERS if k[0] == block["file"] and block["first"].startswith(k[1])]
    assert keys, (f"{block_id(block)} ({block['first'][:60]!r}) is not covered by tests/test_docs.py: "
                  "add a handler (or a justified skip) for it")
    handler = HANDLERS[max(keys, key=lambda k: len(k[1]))]
    if handler is None:   # svd_lora.md's recipes
        body = block["body"]
        if "merge_method: tsv" in body:
            return svd_recipe
        if "merge_method: ties" in body:
            return lora_full_model_recipe
        if "merge_method: task_arithmetic" in body:
            return lora_adapter_recipe
        raise AssertionError(f"{block_id(block)}: an svd_lora.md recipe this test does not know")
    return handler


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=block_id)
def test_documented_block_runs(block, world, tmp_path, capsys):
    handler = _handler(block)
    handler(block, world, fresh_cwd(world, tmp_path), capsys)


def test_every_handler_has_its_block():
    """A handler whose block left the docs is stale: the docs changed and this file did not."""
    for file, first in HANDLERS:
        assert any(b["file"] == file and b["first"].startswith(first) for b in ALL_BLOCKS), (file, first)


INLINE_SKIP = {
    "python -m mergelab.bench.select": "task selection: fine-tunes MiniLM on the Debian corpora (minutes per task)",
    "make demo": "the benchmark (see the README block)",
    "python -m mergelab.bench.adapt_methods": "the benchmark's adaptation rows on MiniLM (being rewritten)",
    "PYTHONPATH=src python benchmarks/smile_svd_timing.py": "timing script over the cached MiniLM fine-tunes",
}


@pytest.mark.parametrize("cmd", sorted({c for d in DOCS for c in inline_commands(d)}))
def test_inline_command_parses(cmd):
    reason = next((r for prefix, r in INLINE_SKIP.items() if cmd.startswith(prefix)), None)
    if reason is not None:
        pytest.skip(reason)
    assert cmd.startswith("mergelab"), f"an inline command this test does not know: {cmd!r}"
    parse_only(cmd.replace("recipe.yaml", "r.yaml"))


@pytest.mark.parametrize("name", sorted({n for d in DOCS for n in inline_api_names(d)}))
def test_inline_api_name_exists(name):
    """Every ``mergelab.x.y`` the prose names is importable (a module, or an attribute of one)."""
    import importlib
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            assert hasattr(obj, attr), f"the docs name {name!r}: {'.'.join(parts[:cut])} has no {attr!r}"
            obj = getattr(obj, attr)
        return
    raise AssertionError(f"the docs name {name!r}, which does not import")
