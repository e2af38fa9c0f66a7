"""Zero-shot heads, the cosine schedule, multi-task fine-tuning, the paired bootstrap, failed rows and
the suite definitions (issue 14). Tiny real BERT models built here; nothing is fetched."""
import copy
import dataclasses
import json
import math

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, BertTokenizerFast

from mergelab.bench import data, report, suite as suites, train
from mergelab.bench.evaluate import EvalResult, bootstrap_replicates, paired_bootstrap, paired_diff
from mergelab.bench.runner import load_head, method_rows, run_benchmark, save_head
from mergelab.bench.suite import MethodSpec, Protocol, Suite, load_suite_file
from mergelab.errors import MergelabError

WORDS = "[PAD] [UNK] [CLS] [SEP] [MASK] red blue cat dog the a is and big small old new one two three .".split()


def tiny():
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=len(WORDS), max_position_embeddings=32, attn_implementation="eager")
    return BertModel(cfg).eval(), BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)})


def test_zero_shot_head_is_the_normalised_mean_of_normalised_prompt_embeddings():
    enc, tok = tiny()
    prompts = [["a red cat .", "the red dog ."], ["a blue cat .", "one blue dog ."], ["big old cat ."]]
    head = train.zero_shot_head(enc, tok, prompts, scale=7.0, max_len=16)
    assert isinstance(head, train.ZeroShotHead) and not any(p.requires_grad for p in head.parameters())
    assert torch.equal(head.bias, torch.zeros(3))
    assert torch.allclose(head.weight.norm(dim=1), torch.full((3,), 7.0), atol=1e-5)
    for c, ps in enumerate(prompts):  # by hand, one prompt at a time
        es = []
        for ptext in ps:
            ids = torch.tensor([tok(ptext)["input_ids"]])
            e = enc(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.mean(1)[0]
            es.append(e / e.norm())
        m = torch.stack(es).mean(0)
        assert torch.allclose(head.weight[c], 7.0 * m / m.norm(), atol=1e-5)
    # logits = scale * cosine(x, class embedding): invariant to the scale of x
    x = torch.randn(4, 32)
    assert torch.allclose(head(x), head(3.0 * x), atol=1e-5)
    cos = nn.functional.normalize(x, dim=-1) @ nn.functional.normalize(head.weight, dim=-1).T
    assert torch.allclose(head(x), 7.0 * cos, atol=1e-5)
    with pytest.raises(MergelabError):
        train.zero_shot_head(enc, tok, [["a"], []])


def test_prompts_come_from_the_task_templates_and_labels_never_reach_the_head(tmp_path):
    spec = data.TaskSpec("zs_colors", "colours", lambda: [(f"{c} cat {i}", c) for c in ("red", "blue")
                                                          for i in range(30)],
                         class_names={"red": "the colour red"}, templates=("A text about {}.", "{}!"))
    data.register_task(spec, overwrite=True)
    td = data.load_task("zs_colors", 20, 5, 10)
    assert td.classes == ["blue", "red"]
    assert td.prompts == [["A text about blue.", "blue!"], ["A text about the colour red.", "the colour red!"]]
    # the head of the built-in tasks uses their class names
    assert data.TASKS["fortune_lang"].prompts(["de"]) == [["A text in German.", "A quotation written in German.",
                                                           "This sentence is in German."]]
    enc, tok = tiny()
    h1 = train.zero_shot_head(enc, tok, td.prompts)
    td2 = data.load_task("zs_colors", 20, 5, 10, seed=3)  # other examples, other labels: same head
    h2 = train.zero_shot_head(enc, tok, td2.prompts)
    assert torch.equal(h1.weight, h2.weight)
    save_head(tmp_path / "head.safetensors", h1)
    back = load_head(tmp_path)
    assert isinstance(back, train.ZeroShotHead) and torch.equal(back.weight, h1.weight)


def test_lr_schedule_warmup_then_cosine():
    f = [train.lr_factor(s, 10, 2, "cosine") for s in range(10)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert f[2] == pytest.approx(1.0) and f[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a >= b for a, b in zip(f[1:], f[2:]))
    with pytest.raises(MergelabError):
        train.lr_factor(5, 10, 2, "step")


def test_multitask_finetune_trains_through_each_task_head():
    enc, tok = tiny()
    seqs = [tok(t)["input_ids"] for t in ["red cat", "blue cat", "red dog", "blue dog"] * 8]
    colour = [0, 1, 0, 1] * 8
    heads = [train.zero_shot_head(enc, tok, [["red"], ["blue"]], scale=10),
             train.zero_shot_head(enc, tok, [["cat"], ["dog"]], scale=10)]
    before = [h.weight.clone() for h in heads]
    tids = [i % 2 for i in range(32)]
    labels = [colour[i] if tids[i] == 0 else [0, 0, 1, 1][i % 4] for i in range(32)]

    def loss():
        z = train.embed(enc, seqs)
        return sum(nn.functional.cross_entropy(heads[t](z[i:i + 1]), torch.tensor([labels[i]])).item()
                   for i, t in enumerate(tids))
    l0 = loss()
    train.finetune(enc, None, seqs, labels, steps=12, lr=3e-3, batch_size=16, tasks=tids, heads=heads,
                   schedule="cosine", freeze_embeddings=False)
    assert loss() < l0
    assert all(torch.equal(h.weight, b) for h, b in zip(heads, before))


def test_paired_bootstrap_matches_the_paired_se():
    g = torch.Generator().manual_seed(0)
    a = [(torch.rand(400, generator=g) < 0.8).tolist(), (torch.rand(300, generator=g) < 0.6).tolist()]
    b = [[x and bool(torch.rand(1, generator=g) < 0.9) for x in t] for t in a]  # b = a with some errors
    res = paired_bootstrap(a, b, n_boot=2000)
    ea = [EvalResult(sum(t) / len(t), len(t), t) for t in a]
    eb = [EvalResult(sum(t) / len(t), len(t), t) for t in b]
    d, se = paired_diff(ea, eb)
    assert res["diff"] == pytest.approx(d)
    assert res["se"] == pytest.approx(se, rel=0.15)
    assert res["ci_low"] < d < res["ci_high"] and res["ci_low"] > 0  # b only loses examples
    rep = bootstrap_replicates([a, a], n_boot=50)
    assert torch.equal(rep[0], rep[1])  # same indices for every model: a - a is exactly 0
    assert rep.shape == (2, 50)


def _tiny_suite(methods, **protocol):
    ex = [(f"{c} {a} {w}", c, a) for c in ("red", "blue") for a in ("cat", "dog")
          for w in ("big", "small", "old", "new", "one", "two", "three", "the", "a", "is")]
    data.register_task(data.TaskSpec("zt_color", "colour", lambda: [(t, c) for t, c, _ in ex]), overwrite=True)
    data.register_task(data.TaskSpec("zt_animal", "animal", lambda: [(t, a) for t, _, a in ex],
                                     templates=("a {} .",)), overwrite=True)
    p = dict(n_train=16, n_val=8, n_test=12, max_len=8, batch_size=8, steps=2, lr=1e-3)
    p.update(protocol)
    return Suite("zt", ["zt_color", "zt_animal"], Protocol(**p), methods)


def broken_builder(models, tasks, params):
    raise RuntimeError("this method is broken\nsecond line")


def test_failed_row_is_recorded_and_partial_results_are_written(tmp_path):
    s = _tiny_suite([MethodSpec("broken", builder=broken_builder),
                     MethodSpec("task_arithmetic", "task_arithmetic", grid={"lambda": [0.5, 1.0]},
                                default={"lambda": 0.3})],
                    finetune_seeds=[0, 1], mtl_steps=2)
    partial = tmp_path / "partial.json"
    res = run_benchmark(s, cache_dir=tmp_path / "cache", threads=None, base=tiny(), partial_path=partial)
    rows = res["rows"]
    assert rows["broken"] == {"kind": "failed", "error": "RuntimeError: this method is broken",
                              "method": "builder", "how": "fixed"}
    assert {"zero_shot", "individual", "ensemble", "multitask", "task_arithmetic@paper",
            "task_arithmetic"} <= set(rows)
    assert rows["task_arithmetic@paper"]["chosen"] == {"lambda": 0.3}
    search = res["runs"]["0"]["rows"]["task_arithmetic@paper"]["search"]
    assert len(search) == 1 and search[0]["val_average"] != search[0]["val_average"]  # nan: validation unused
    assert set(res["runs"]) == {"0", "1"}
    r0, r1 = (res["runs"][k]["rows"]["individual"]["average"] for k in ("0", "1"))
    assert rows["individual"]["average"] == pytest.approx((r0 + r1) / 2)
    assert res["runs"]["0"]["correct"]["zero_shot"] == res["runs"]["1"]["correct"]["zero_shot"]
    js = json.loads(partial.read_text())
    assert js["complete"] and js["rows"]["broken"]["kind"] == "failed"
    out = report.write_report(res, tmp_path / "run", plots=False)
    md = (out / "results.md").read_text()
    assert "| broken | - | - | failed |" in md and "broken (seed 0): RuntimeError: this method is broken" in md
    assert "### Seed 1" in md and "paired bootstrap" in md
    checks = report.order_check(res)
    assert [(c["a"], c["b"]) for c in checks] == [("individual", "task_arithmetic"), ("task_arithmetic", "zero_shot")]
    assert set(checks[0]["per_seed"]) == {"0", "1"}


def test_method_rows_paper_default_and_tuned():
    spec = MethodSpec("ties", "ties", grid={"lambda": [0.5, 1.0]}, params={"merge": "mean"},
                      default={"density": 0.2, "lambda": 1.0})
    rows = method_rows(spec)
    assert [(n, how) for n, _, how in rows] == [("ties@paper", "paper default"), ("ties", "validation-tuned")]
    assert rows[0][1] == [{"merge": "mean", "density": 0.2, "lambda": 1.0}]
    assert [n for n, _, _ in method_rows(MethodSpec("average", "average"))] == ["average"]


def test_built_in_suites_and_yaml_prompts(tmp_path):
    text8 = suites.get_suite("text8")
    assert len(text8.tasks) == 8 and set(suites.TEXT6_TASKS) - {"gcide"} <= set(text8.tasks)
    assert text8.protocol.head == "zero_shot" and text8.protocol.finetune_seeds == [0, 1]
    assert text8.protocol.mtl_steps > 0 and text8.protocol.n_test >= 1000 and text8.protocol.n_val >= 300
    names = {m.name for m in text8.methods}
    assert {"average", "task_arithmetic", "ties", "breadcrumbs", "dare_ties", "tsv", "iso_c", "iso_cts"} <= names
    assert any(n.startswith("smile") for n in names) and any(n.startswith("adamerging") for n in names)
    assert any(n.startswith("concrete") for n in names)
    for t in text8.tasks + suites.get_suite("demo").tasks:
        spec = data.TASKS[t]
        assert spec.templates and all(x.count("{}") == 1 for x in spec.templates)
    demo = suites.get_suite("demo")
    assert len(demo.tasks) == 3 and demo.protocol.head == "zero_shot"
    # the measured 5-minute demo (docs/results/demo-2026-12-01-80steps): short fine-tunes, text8's data
    assert (demo.protocol.steps, demo.protocol.lr) == (80, 2e-4) and set(demo.tasks) <= set(text8.tasks)
    assert (demo.protocol.n_test, demo.protocol.n_val) == (text8.protocol.n_test, text8.protocol.n_val)
    assert {m.name for m in demo.methods} >= {"average", "task_arithmetic", "ties"}
    (tmp_path / "s.yaml").write_text(
        "tasks:\n  - {name: fortune_lang, templates: ['Written in {}.'], class_names: {de: Deutsch}}\n"
        "protocol: {head: probe, steps: 3, finetune_seeds: [0, 1]}\n"
        "methods:\n  - {name: ta, method: task_arithmetic, grid: {lambda: [0.2, 0.4]}, default: {lambda: 0.3}}\n")
    builtin = data.TASKS["fortune_lang"].prompts(["de", "en"])
    s = load_suite_file(tmp_path / "s.yaml")
    assert s.protocol.head == "probe" and s.protocol.finetune_seeds == [0, 1]
    assert s.task_spec("fortune_lang").prompts(["de", "en"]) == [["Written in Deutsch."], ["Written in English."]]
    assert data.TASKS["fortune_lang"].prompts(["de", "en"]) == builtin   # only this suite sees its prompts
    assert s.methods[0].default == {"lambda": 0.3}
    (tmp_path / "bad.yaml").write_text("tasks:\n  - {name: gcide, templates: ['no placeholder']}\n")
    with pytest.raises(MergelabError, match="templates"):
        load_suite_file(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text("tasks: [gcide]\nprotocol: {head: linear}\n")
    with pytest.raises(MergelabError, match="head"):
        load_suite_file(tmp_path / "bad2.yaml")


def test_adapt_data_folder_reads_a_zero_shot_head_as_one(tmp_path):
    from mergelab.adapt.text import read_data_dir
    enc, tok = tiny()
    head = train.zero_shot_head(enc, tok, [["red"], ["blue"]], scale=5)
    (tmp_path / "t1").mkdir()
    (tmp_path / "t1" / "inputs.txt").write_text("red cat\nblue dog\n")
    save_head(tmp_path / "t1" / "head.safetensors", head)
    (task,) = read_data_dir(tmp_path, 1, hidden_size=32)
    x = torch.randn(3, 32)
    assert isinstance(task.head, train.ZeroShotHead) and torch.allclose(task.head(x), head(x))


def test_tuned_row_that_picks_the_paper_default_reuses_its_test_outcomes(tmp_path, monkeypatch):
    from mergelab.bench import runner
    calls = []
    real = runner.evaluate_built

    def counting(model, models, tasks, split, *a, **k):
        calls.append((split, k.get("desc", "")))
        return real(model, models, tasks, split, *a, **k)
    monkeypatch.setattr(runner, "evaluate_built", counting)
    s = _tiny_suite([MethodSpec("task_arithmetic", "task_arithmetic", grid={"lambda": [0.3, 0.3]},
                                default={"lambda": 0.3})], ensemble=False)
    res = run_benchmark(s, cache_dir=tmp_path / "cache", threads=None, base=tiny())
    tests = [d for split, d in calls if split == "test"]
    assert tests == ["test: zero-shot", "test: task_arithmetic@paper"]  # the tuned row is not re-tested
    assert res["correct"]["task_arithmetic"] == res["correct"]["task_arithmetic@paper"]
    assert res["rows"]["task_arithmetic"]["chosen"] == {"lambda": 0.3}


CALLS: list = []


def counting_builder(models, tasks, params):
    CALLS.append(dict(params))
    enc = models.encoder()
    enc.bench_info = {"coefficients_min": 0.25, "coefficients_mean": 0.3, "coefficients_max": 0.5,
                      "mask_kept_fraction": 0.4, "steps_run": 7}
    return enc


def test_resume_takes_finished_rows_from_earlier_runs(tmp_path):
    """Seeds run side by side, then combined: nothing is measured again; a changed grid is."""
    methods = [MethodSpec("counted", builder=counting_builder, params={"k": 1}),
               MethodSpec("task_arithmetic", "task_arithmetic", grid={"lambda": [0.5, 1.0]}, default={"lambda": 0.3})]
    s = _tiny_suite(methods, finetune_seeds=[0, 1])
    cache = tmp_path / "cache"
    r0 = json.loads(json.dumps(run_benchmark(s, cache_dir=cache, threads=None, base=tiny(), seeds=[0]), default=str))
    r1 = json.loads(json.dumps(run_benchmark(s, cache_dir=cache, threads=None, base=tiny(), seeds=[1]), default=str))
    CALLS.clear()
    both = run_benchmark(s, cache_dir=cache, threads=None, base=tiny(), resume=[r0, r1])
    assert CALLS == []
    assert set(both["resumed_rows"]["0"]) == {"zero_shot", "individual", "ensemble", "counted",
                                              "task_arithmetic@paper", "task_arithmetic"}
    for seed, r in (("0", r0), ("1", r1)):
        assert both["runs"][seed]["correct"] == r["runs"][seed]["correct"]
    assert both["runs"]["1"]["rows"]["counted"]["info"]["mask_kept_fraction"] == 0.4   # a builder's bench_info
    md = report.markdown_report(both)
    assert "| counted | 1 | 0.250 / 0.300 / 0.500 | 40.0 % | - | - -> - | 7 | - |" in md
    out = report.write_report(both, tmp_path / "two-seeds", plots=True)
    assert (out / "lambda_sweep.png").is_file()   # drawn from a seed's searches: the seed mean keeps none
    assert both["rows"]["task_arithmetic"]["average"] == pytest.approx(
        (r0["rows"]["task_arithmetic"]["average"] + r1["rows"]["task_arithmetic"]["average"]) / 2)
    # a partial earlier run: its failed or missing rows are measured, the changed grid is measured again
    partial = json.loads(json.dumps(r0))
    partial["runs"]["0"]["rows"]["counted"] = {"kind": "failed", "error": "x"}
    s2 = _tiny_suite([methods[0], MethodSpec("task_arithmetic", "task_arithmetic", grid={"lambda": [0.7, 1.0]},
                                             default={"lambda": 0.3})], finetune_seeds=[0])
    res = run_benchmark(s2, cache_dir=cache, threads=None, base=tiny(), resume=[partial])
    assert CALLS == [{"k": 1}]
    assert set(res["resumed_rows"]["0"]) == {"zero_shot", "individual", "ensemble", "task_arithmetic@paper"}
    assert [x["params"]["lambda"] for x in res["runs"]["0"]["rows"]["task_arithmetic"]["search"]] == [0.7, 1.0]
    # an earlier run of another protocol lends nothing: refused in one line
    with pytest.raises(MergelabError, match="protocol differs from this run's .*n_test"):
        run_benchmark(_tiny_suite(methods, n_test=10), cache_dir=cache, threads=None, base=tiny(), resume=[r0])


def test_leaderboard_rows_run_in_the_benchmark(tmp_path):
    full = suites.get_suite("text8-all")
    names = [m.name for m in full.methods]
    assert names[:len(suites.get_suite("text8").methods)] == [m.name for m in suites.get_suite("text8").methods]
    assert {"regmean", "fisher", "ties+lines", "emr", "wudi", "wemoe@test"} <= set(names)
    rows = {m.name: m for m in suites.leaderboard_rows()}
    wemoe = dataclasses.replace(rows["wemoe@test"], params={**rows["wemoe@test"].params, "steps": 3})
    s = _tiny_suite([rows["ties+lines"], rows["emr"], rows["regmean"], wemoe])
    res = run_benchmark(s, cache_dir=tmp_path / "cache", threads=None, base=tiny())
    got = res["rows"]
    assert [x.get("kind") for x in (got["ties+lines"], got["emr"], got["regmean"])] == ["method"] * 3, got
    assert [x["params"]["lines"] for x in got["ties+lines"]["search"]] == [{"beta": 0.2}, {"beta": 0.5}, {"beta": 1.0}]
    n_base = got["zero_shot"]["params"]
    assert got["emr"]["params"] == 2 * n_base and got["regmean"]["params"] == n_base   # EMR: one encoder per task
    assert got["wemoe@test"].get("kind") == "method", got["wemoe@test"]
    assert got["wemoe@test"]["params"] > n_base      # one shared model: base + task vectors of the MLPs + routers


def test_eval_cache_reuses_scored_encoders_and_measures_changed_ones(tmp_path, monkeypatch):
    """A re-run takes every torch/transformers encoder's logits from CACHE/evals, bit for bit; a
    changed merge, a damaged entry and a mergelab module are measured; --no-eval-cache writes nothing."""
    from mergelab.bench import smile_methods

    methods = [MethodSpec("task_arithmetic", "task_arithmetic", grid={"lambda": [0.5, 1.0]}, default={"lambda": 0.3}),
               MethodSpec("smile", builder=smile_methods.bench_builder, params={"k": 2, "gate_k": 2})]
    s = _tiny_suite(methods)
    cache = tmp_path / "cache"
    first = run_benchmark(s, cache_dir=cache, threads=None, base=tiny())
    ec = first["eval_cache"]
    # zero-shot, 2 fine-tunes, multi-task, paper row, grid (2 val) + test; SMILE is a mergelab module
    assert ec["hits"] == 0 and ec["misses"] >= 7 and ec["not_cacheable"] == 1, ec
    entries = sorted((cache / "evals").glob("*.safetensors"))
    assert len(entries) == ec["misses"]

    embeds = []
    real = train.embed
    monkeypatch.setattr(train, "embed", lambda *a, **k: embeds.append(1) or real(*a, **k))
    again = run_benchmark(s, cache_dir=cache, threads=None, base=tiny())
    assert again["eval_cache"] == {"hits": ec["misses"], "misses": 0, "not_cacheable": 1}
    n_classes = sum(len(first["task_info"][n]["classes"]) for n in s.tasks)
    assert len(embeds) == 1 + n_classes          # the SMILE test pass + the zero-shot heads' prompts (per class)
    assert again["correct"] == first["correct"]
    for name, row in first["rows"].items():
        assert again["rows"][name].get("average") == row.get("average"), name

    for e in entries:                                   # damaged entries are measured again and rewritten
        e.write_bytes(b"not a safetensors file")
    third = run_benchmark(s, cache_dir=cache, threads=None, base=tiny())
    assert third["eval_cache"] == {"hits": 0, "misses": ec["misses"], "not_cacheable": 1}
    assert third["correct"] == first["correct"]
    changed = _tiny_suite([MethodSpec("task_arithmetic", "task_arithmetic", grid={"lambda": [0.5, 0.7]},
                                      default={"lambda": 0.3})])
    fourth = run_benchmark(changed, cache_dir=cache, threads=None, base=tiny())
    assert fourth["eval_cache"]["misses"] >= 1 and fourth["eval_cache"]["hits"] >= 4, fourth["eval_cache"]
    assert fourth["correct"]["task_arithmetic@paper"] == first["correct"]["task_arithmetic@paper"]

    fresh = tmp_path / "fresh"
    off = run_benchmark(s, cache_dir=fresh, threads=None, base=tiny(), eval_cache=False)
    assert off["eval_cache"] is None and not (fresh / "evals").exists()
    assert off["correct"] == first["correct"]


def test_module_fingerprint_sees_every_weight_and_cacheable_refuses_mergelab_modules():
    from mergelab.bench import evalcache
    from mergelab.upscale.smile import upscale_to_smile

    enc, _ = tiny()
    fp = evalcache.module_fingerprint(enc)
    assert evalcache.module_fingerprint(copy.deepcopy(enc)) == fp
    other = copy.deepcopy(enc)
    with torch.no_grad():
        next(iter(other.parameters())).view(-1)[-1] += 1e-7
    assert evalcache.module_fingerprint(other) != fp
    assert evalcache.cacheable(enc)
    sd = {k: v + 0.01 for k, v in enc.state_dict().items() if v.is_floating_point()}
    assert not evalcache.cacheable(upscale_to_smile(enc, [sd, sd], k=2, gate_k=2))
