"""The benchmark end to end on a tiny random BertModel: probes, cached fine-tunes, registry merges,
a model-builder row, validation search, report files and plots."""
import itertools
import json
import random

import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel, BertTokenizerFast

from mergelab.bench import data, report
from mergelab.bench.runner import build_method, merge_encoder_state, run_benchmark
from mergelab.bench.suite import MethodSpec, Protocol, Suite, load_suite_file
from mergelab.errors import MergelabError

WORDS = "[PAD] [UNK] [CLS] [SEP] [MASK] red blue cat dog the a is and big small old new one two three".split()


def tiny_base():
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=len(WORDS), max_position_embeddings=32, attn_implementation="eager")
    return BertModel(cfg).eval(), BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)})


def _texts():
    fill = WORDS[9:]
    out = []
    for color, animal in itertools.product(["red", "blue"], ["cat", "dog"]):
        for combo in itertools.permutations(fill, 3):
            out.append((" ".join((color,) + combo[:2] + (animal,) + combo[2:]), color, animal))
    random.Random(0).shuffle(out)
    return out[:400]


def register_tiny_tasks():
    ex = _texts()
    data.register_task(data.TaskSpec("tiny_color", "color word", lambda: [(t, c) for t, c, _ in ex]),
                       overwrite=True)
    data.register_task(data.TaskSpec("tiny_animal", "animal word", lambda: [(t, a) for t, _, a in ex]),
                       overwrite=True)


def base_builder(models, tasks, params):
    """A model-builder row: the base encoder scaled back from the first fine-tune (a toy method)."""
    return models.encoder(models.base_sd)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    register_tiny_tasks()
    cache = tmp_path_factory.mktemp("cache")
    suite = Suite("tiny", ["tiny_color", "tiny_animal"],
                  Protocol(n_train=48, n_val=24, n_test=32, max_len=16, batch_size=16, steps=3, lr=1e-3),
                  [MethodSpec("average", "average"),
                   MethodSpec("task_arithmetic", "task_arithmetic", grid={"lambda": [0.5, 1.0]}),
                   MethodSpec("ties", "ties", grid={"density": [0.5], "lambda": [0.8, 1.2]},
                              params={"merge": "mean", "trim_scope": "global"}),
                   MethodSpec("base_again", builder=base_builder)])
    base = tiny_base()
    result = run_benchmark(suite, cache_dir=cache, threads=None, base=base)
    again = run_benchmark(suite, cache_dir=cache, threads=None, base=base, methods=suite.methods[:1])
    return suite, cache, result, again, base


def test_rows_and_metrics(bench):
    suite, _, result, _, base = bench
    rows = result["rows"]
    assert list(rows) == ["zero_shot", "individual", "ensemble", "average", "task_arithmetic", "ties",
                          "base_again"]
    n = sum(p.numel() for p in base[0].parameters())
    assert rows["zero_shot"]["params"] == n and rows["individual"]["params"] == 2 * n
    assert rows["ties"]["params"] == n
    assert rows["individual"]["normalized"] == pytest.approx(1.0)
    # the builder row returned the base encoder: identical predictions to the base row
    assert result["correct"]["base_again"] == result["correct"]["zero_shot"]
    for name, row in rows.items():
        accs = [row["per_task"][t] for t in suite.tasks]
        assert row["average"] == pytest.approx(sum(accs) / 2)
        assert all(row["n"][t] == 32 for t in suite.tasks)
    ta = rows["task_arithmetic"]
    assert [s["params"]["lambda"] for s in ta["search"]] == [0.5, 1.0]
    best = max(ta["search"], key=lambda s: s["val_average"])
    assert ta["chosen"] == best["params"]
    assert result["task_info"]["tiny_color"]["sizes"] == {"train": 48, "val": 24, "test": 32}


def test_second_run_uses_cache_and_folders_are_hf(bench):
    _, cache, result, again, _ = bench
    assert any(k.startswith("fine-tune ") for k in result["timings"])
    assert not any(k.startswith("fine-tune ") for k in again["timings"])
    assert any(k.startswith("load cached fine-tune ") for k in again["timings"])
    assert again["correct"]["individual"] == result["correct"]["individual"]
    for path in result["finetuned_paths"].values():
        model = AutoModel.from_pretrained(path)  # a normal Hugging Face folder
        assert model.config.hidden_size == 32
        assert (cache / path.split("/")[-1] / "head.safetensors").exists()
        meta = json.loads((cache / path.split("/")[-1] / "meta.json").read_text())
        assert meta["protocol"]["steps"] == 3


def test_lambda_shortcut_equals_direct_merge(bench):
    from mergelab.bench.runner import ModelPool, TaskPool
    suite, _, _, _, _ = bench
    # rebuild pools cheaply from the first result is not possible; use the runner's helpers directly
    enc, tok = tiny_base()
    base_sd = {k: v.clone() for k, v in enc.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    fts = {t: {k: (v + 0.01 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
               for k, v in base_sd.items()} for t in suite.tasks}
    pool = ModelPool(enc, tok, base_sd, fts, {})
    tasks = TaskPool({t: None for t in suite.tasks}, {})
    spec = MethodSpec("ties", "ties", params={"density": 0.3})
    memo = {}
    via_memo = build_method(spec, pool, tasks, {"density": 0.3, "lambda": 0.6}, memo).state_dict()
    direct = merge_encoder_state(spec, pool, suite.tasks, {"density": 0.3, "lambda": 0.6})
    for k, v in direct.items():
        assert torch.allclose(via_memo[k], v, atol=1e-6), k


def test_report_files(bench, tmp_path):
    _, _, result, _, _ = bench
    out = report.write_report(result, tmp_path / "run")
    names = {p.name for p in out.iterdir()}
    assert {"results.md", "results.csv", "results.json", "per_task.png", "normalized.png",
            "lambda_sweep.png"} <= names
    assert not list(tmp_path.glob("run.tmp*"))
    for png in ("per_task.png", "normalized.png", "lambda_sweep.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    md = (out / "results.md").read_text()
    assert "| task_arithmetic |" in md and "Order check" in md and "lambda=" in md
    csv_lines = (out / "results.csv").read_text().strip().splitlines()
    assert csv_lines[0].startswith("model,tiny_color,tiny_animal,average")
    assert len(csv_lines) == 1 + len(result["rows"])
    js = json.loads((out / "results.json").read_text())
    checks = js["order_check"]
    assert [(c["a"], c["b"]) for c in checks] == [("individual", "ties"), ("ties", "task_arithmetic"),
                                                  ("task_arithmetic", "average"), ("average", "zero_shot")]
    assert "literature order" in report.order_text(checks)


def test_suite_yaml(tmp_path):
    (tmp_path / "t.tsv").write_text("pos\tgood fine great\nneg\tbad awful\npos\tnice one\nneg\tpoor\n")
    (tmp_path / "s.yaml").write_text(
        "name: mine\ntasks:\n  - {name: yaml_sent, format: tsv, path: t.tsv}\n  - tiny_color\n"
        "protocol: {n_train: 2, n_val: 1, n_test: 1, steps: 1}\n"
        "methods:\n  - {name: ties, grid: {lambda: [0.5, 1.0]}, params: {density: 0.2}}\n")
    register_tiny_tasks()
    s = load_suite_file(tmp_path / "s.yaml")
    assert s.name == "mine" and s.tasks == ["yaml_sent", "tiny_color"] and s.protocol.steps == 1
    assert s.methods[0].method == "ties" and len(s.methods[0].settings()) == 2
    td = data.load_task("yaml_sent", 2, 1, 1, spec=s.task_spec("yaml_sent"))
    assert td.classes == ["neg", "pos"] and td.sizes() == {"train": 2, "val": 1, "test": 1}
    assert "yaml_sent" not in data.TASKS   # the suite's own task: the registry is unchanged
    (tmp_path / "bad.yaml").write_text("tasks: [no_such_task]\n")
    with pytest.raises(MergelabError, match="unknown task"):
        load_suite_file(tmp_path / "bad.yaml")


def test_cli_list_and_bad_arguments(capsys):
    from mergelab import cli as cli_bench   # the main CLI, which registers `bench`
    assert cli_bench.main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert "text6" in out and "wordnet_verb" in out and "dict-gcide" in out
    assert cli_bench.main(["bench", "--suite", "demo", "--methods", "ties,nope"]) == 2
    assert "unknown nope" in capsys.readouterr().err
    assert cli_bench.main(["bench", "--suite", "demo", "--model", "gcide"]) == 2
    assert cli_bench.main(["bench", "--suite", "no_such_suite"]) == 2


def test_any_registry_method_runs_on_any_suite_and_list_shows_suites(capsys):
    """Issue 21 item 6: `--methods iso_c` on a suite that does not list it is a row at paper defaults;
    `--list` names each suite's tasks and methods; a name that is no method is one clear error."""
    from mergelab.cli import main
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert "demo: tasks" in out and "methods" in out and "any registry method" in out
    rc = main(["bench", "--suite", "demo", "--methods", "no_such_method", "--out", "/nonexistent/x"])
    assert rc == 2 and "and any merge method of 'mergelab methods'" in capsys.readouterr().err
    from mergelab.bench import suite as suites
    from mergelab.methods import REGISTRY
    s = suites.get_suite("demo")
    assert "iso_c" not in [m.name for m in s.methods] and "iso_c" in REGISTRY
    from mergelab.cli.bench import select_methods
    rows = select_methods(s, ["iso_c", s.methods[0].name])
    assert rows[0].name == "iso_c" and rows[0].method == "iso_c" and not rows[0].grid and rows[1] is s.methods[0]
