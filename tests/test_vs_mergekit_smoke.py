"""Smoke run of benchmarks/vs_mergekit.py at the tiny size (mergelab only; never installs mergekit).

The benchmark itself is not part of the test suite; this checks that its generator writes a
loadable 3-shard Llama checkpoint, that its measurement and comparison helpers report real
figures, and that a mergelab-only run produces a table with timings for every row.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "vs_mergekit.py"


def _load():
    spec = importlib.util.spec_from_file_location("vs_mergekit", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["vs_mergekit"] = mod
    spec.loader.exec_module(mod)
    return mod


vs = _load()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    wd = tmp_path_factory.mktemp("vs")
    ck = vs.generate(wd, "tiny", 2, "sparse", 0.002, 0.25, "float32", 7, lambda m: None)
    return wd, ck


def test_generator_writes_loadable_sharded_llama(tiny):
    from transformers import LlamaForCausalLM

    wd, ck = tiny
    shards = sorted(ck["base"].glob("*.safetensors"))
    assert len(shards) == vs.N_SHARDS
    model = LlamaForCausalLM.from_pretrained(ck["base"])
    assert sum(p.numel() for p in model.parameters()) == ck["n_params"]
    base, ft = vs.Ckpt(ck["base"]), vs.Ckpt(ck["models"][0])
    w = "model.layers.0.mlp.up_proj.weight"
    d = ft.get(w) - base.get(w)
    frac = float((d != 0).float().mean())
    assert 0.15 < frac < 0.35  # sparse deltas at density 0.25
    assert 0.001 < float(d[d != 0].std()) < 0.003
    # same seed, same bytes: the cache is reusable and runs are reproducible
    again = vs._base_tensor(7, 0, "model.embed_tokens.weight", base.get("model.embed_tokens.weight").shape)
    assert torch.equal(again, base.get("model.embed_tokens.weight"))
    # a second call reuses the cached checkpoints (no rewrite)
    mtime = shards[0].stat().st_mtime_ns
    vs.generate(wd, "tiny", 2, "sparse", 0.002, 0.25, "float32", 7, lambda m: None)
    assert shards[0].stat().st_mtime_ns == mtime


def test_param_count_sizes():
    assert vs.llama_layout("1gb")[1] and sum(
        __import__("math").prod(s) for _, s in vs.llama_layout("1gb")[1]) == 248_148_992
    kw = vs.llama_shape_for("500M")
    assert kw["num_hidden_layers"] == 33


def test_run_measured_reports_peak_memory(tmp_path):
    code = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.3)"
    res = vs.run_measured([sys.executable, "-c", code], None, tmp_path / "log.txt")
    assert res["rc"] == 0
    assert res["peak_rss_mb"] > 300 and res["peak_anon_mb"] > 250
    assert res["wall_s"] >= 0.3
    # the parent's own peak must not leak into the child's figure (Linux ru_maxrss after vfork/exec)
    big = bytearray(400 * 2**20)
    big[::4096] = b"y" * len(big[::4096])
    small = vs.run_measured([sys.executable, "-c", "pass"], None, tmp_path / "l1.txt")
    del big
    assert small["peak_rss_mb"] < 100
    bad = vs.run_measured([sys.executable, "-c", "raise SystemExit(3)"], None, tmp_path / "l2.txt")
    assert bad["rc"] == 3


def test_compare_exact_finds_the_differing_tensor(tiny, tmp_path):
    from safetensors.torch import save_file

    _, ck = tiny
    src = vs.Ckpt(ck["base"])
    sd = {k: src.get(k).clone() for k in src.keys()}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_file(sd, str(tmp_path / "a" / "model.safetensors"))
    sd["model.norm.weight"][3] += 0.5
    save_file(sd, str(tmp_path / "b" / "model.safetensors"))
    same = vs.compare_exact(tmp_path / "a", tmp_path / "a")
    assert same["max_abs_diff"] == 0.0 and same["n_tensors"] == len(sd)
    diff = vs.compare_exact(tmp_path / "a", tmp_path / "b")
    assert diff["worst_tensor"] == "model.norm.weight"
    assert diff["max_abs_diff"] == pytest.approx(0.5, abs=1e-6)
    st = vs.compare_stats(tmp_path / "b", tmp_path / "b", tmp_path / "a")
    assert st["delta_norm_ratio"] == pytest.approx(1.0) and st["delta_cosine"] == pytest.approx(1.0)


def test_smoke_run_mergelab_only(tiny, tmp_path):
    wd, _ = tiny
    out = tmp_path / "res.json"
    p = subprocess.run([sys.executable, str(SCRIPT), "--size", "tiny", "--models", "2",
                        "--delta", "sparse", "--delta-density", "0.25", "--seed", "7",
                        "--tools", "mergelab", "--threads", "1", "--workdir", str(wd),
                        "--methods", "task_arithmetic,ties-global",
                        "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "| method |" in p.stdout
    res = json.loads(out.read_text())
    assert [r["key"] for r in res["rows"]] == ["copy", "copy-mmap", "task_arithmetic", "ties-global"]
    rows = res["rows"][2:]
    # the I/O references read every input file once and wrote one checkpoint's worth
    for copy in (res["rows"][0]["copy"], res["rows"][1]["copy"]):
        assert copy["rc"] == 0 and copy["wall_s"] > 0
        assert copy["bytes_read"] > 2.5 * copy["bytes_written"] > 0     # base + 2 fine-tunes read, base written
    assert "| copy | reference (no torch) |" in p.stdout and "| copy-mmap | reference (mmap, numpy) |" in p.stdout
    table = [line for line in p.stdout.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1 and len(table) == 2 + 4   # header, rule, 4 rows
    for r in rows:
        assert r["mergelab"]["rc"] == 0
        assert r["mergelab"]["wall_s"] > 0 and r["mergelab"]["peak_rss_mb"] > 0
        assert r["key"] in p.stdout
    assert "mergekit" not in res["info"]["tools"]
