"""Streaming merges of real checkpoint folders, loading with transformers, and every bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from mergelab import load_state_dict, merge, merge_state_dicts
from mergelab.cli import main
from mergelab.io import ShardedWriter
from tests.helpers import make_model_folders, write_recipe


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return make_model_folders(root)


def run_cli(*args):
    return main([str(a) for a in args])


def test_merge_folder_round_trip_and_transformers_load(folders, tmp_path):
    base, models = folders
    recipe = write_recipe(tmp_path / "r.yaml", base, models, "ties", {"density": 0.3, "lambda": 0.9})
    out = tmp_path / "out"
    summary = merge(recipe, out, shard_size="20KB")
    assert summary.shards > 1 and (out / "model.safetensors.index.json").exists()
    assert (out / "config.json").exists() and (out / "vocab.txt").exists() and (out / "mergelab_recipe.yaml").exists()
    merged = load_state_dict(out)
    expected = merge_state_dicts(load_state_dict(base), [load_state_dict(m) for m in models], "ties",
                                 {"density": 0.3, "lambda": 0.9})
    assert merged.keys() == expected.keys()
    for k in expected:
        assert torch.equal(merged[k], expected[k]), k
    model = AutoModel.from_pretrained(out, attn_implementation="eager")
    for k, v in model.state_dict().items():
        if k in merged:
            assert torch.equal(v, merged[k]), k
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_cli_merge_every_method_and_summary(folders, tmp_path, capsys):
    base, models = folders
    for method in ("average", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties",
                   "dare_linear", "model_stock"):
        recipe = write_recipe(tmp_path / f"{method}.yaml", base, models, method)
        assert run_cli("merge", recipe, tmp_path / method, "--quiet") == 0, method
    assert "merged" in capsys.readouterr().out


def test_sharded_and_bin_inputs_and_bf16_output(tmp_path):
    base, models = make_model_folders(tmp_path / "m", n=2, shard="20KB")
    assert (base / "model.safetensors.index.json").exists()
    sd = load_state_dict(models[1])
    binfile = tmp_path / "ft.bin"
    torch.save(sd, binfile)
    recipe = write_recipe(tmp_path / "r.yaml", base, [models[0], binfile], "task_arithmetic", {"lambda": 0.5},
                          out_dtype="bfloat16")
    merge(recipe, tmp_path / "out")
    merged = load_state_dict(tmp_path / "out")
    b, m0 = load_state_dict(base), load_state_dict(models[0])
    k = "encoder.layer.0.attention.self.query.weight"
    assert merged[k].dtype == torch.bfloat16
    assert torch.equal(merged[k], (b[k] + 0.5 * ((m0[k] - b[k]) + (sd[k] - b[k]))).to(torch.bfloat16))
    assert json.loads((tmp_path / "out" / "config.json").read_text()).get("torch_dtype", "bfloat16") == "bfloat16"


def test_fp16_inputs_written_in_input_dtype(tmp_path):
    base, models = make_model_folders(tmp_path / "m", n=2, dtype=torch.float16)
    merge(write_recipe(tmp_path / "r.yaml", base, models, "ties"), tmp_path / "out")
    merged = load_state_dict(tmp_path / "out")
    assert merged["pooler.dense.weight"].dtype == torch.float16


def test_writer_layout_is_valid_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7), "c": torch.randn(2).to(torch.bfloat16),
               "empty": torch.zeros(0, 4)}
    writer = ShardedWriter(tmp_path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()])
    for k in reversed(list(tensors)):
        writer.write(k, tensors[k])
    writer.close()
    loaded = load_file(tmp_path / "model.safetensors")
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v)


@pytest.mark.parametrize("memory_map", [True, False])
def test_reads_are_private_copies(tmp_path, monkeypatch, memory_map):
    """Mapped (copy-on-write) and pread reads give the same tensors; writing into one never
    reaches the file, and blocks of rows are the rows."""
    from mergelab.io import SafetensorsFile
    monkeypatch.setattr(SafetensorsFile, "memory_map", memory_map)
    monkeypatch.setattr(SafetensorsFile, "MAP_MIN_BYTES", 1)
    tensors = _writer_case(seed=3)
    save_file(tensors, tmp_path / "model.safetensors")
    before = (tmp_path / "model.safetensors").read_bytes()
    f = SafetensorsFile(tmp_path / "model.safetensors")
    for k, v in tensors.items():
        t = f.get(k)
        assert torch.equal(t, v), k
        if v.dim() >= 2:
            assert torch.equal(f.get(k, (2, 7)), v[2:7]), k
        if t.numel():
            t.zero_()
    f.close()
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_mapped_reads_fall_back_to_pread_when_maps_fail(tmp_path, monkeypatch):
    """Out of file descriptors (each map holds one), reads still work."""
    import errno
    import mmap as mmap_module

    from mergelab.io import SafetensorsFile

    def no_map(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")
    monkeypatch.setattr(SafetensorsFile, "MAP_MIN_BYTES", 1)
    monkeypatch.setattr(mmap_module, "mmap", no_map)
    tensors = _writer_case(seed=4)
    save_file(tensors, tmp_path / "model.safetensors")
    f = SafetensorsFile(tmp_path / "model.safetensors")
    for k, v in tensors.items():
        assert torch.equal(f.get(k), v), k
    f.close()


def _writer_case(seed=0):
    """Tensors whose bytes straddle pages in every way: odd sizes, half precision, some over a page."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"tiny": torch.randn(3, generator=g).to(torch.float16), "ids": torch.arange(5, dtype=torch.int64),
               "mid": torch.randn(37, 129, generator=g), "big": torch.randn(301, 67, generator=g),
               "half": torch.randn(123, 45, generator=g).to(torch.bfloat16), "one": torch.randn((), generator=g),
               "wide": torch.randn(9, 1031, generator=g)}
    return tensors


def _write_in_blocks(writer, tensors, order_seed=0):
    """Whole tensors and blocks of rows, from several threads, in a shuffled order."""
    import random
    from concurrent.futures import ThreadPoolExecutor
    pieces = []
    for name, t in tensors.items():
        if t.dim() >= 2 and t.shape[0] > 10:
            step = max(1, t.shape[0] // 4)
            pieces += [(name, t[a:a + step], a) for a in range(0, t.shape[0], step)]
        else:
            pieces.append((name, t, 0))
    random.Random(order_seed).shuffle(pieces)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda p: writer.write(*p), pieces))


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("background", [True, False])
def test_writer_direct_and_background_write_the_same_bytes(tmp_path, direct, background):
    tensors = _writer_case()
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    reference = tmp_path / "reference"
    reference.mkdir()
    save_file(tensors, reference / "model.safetensors")
    for shard_bytes in (10**9, 40_000):                    # one file, and several shards
        out = tmp_path / f"out-{shard_bytes}"
        out.mkdir()
        writer = ShardedWriter(out, layout, shard_bytes, direct=direct, background=background)
        _write_in_blocks(writer, tensors, order_seed=shard_bytes)
        writer.close()
        loaded = load_state_dict(out)
        assert list(loaded) == list(tensors)
        for k, v in tensors.items():
            assert torch.equal(loaded[k], v), k
        files = sorted(out.glob("*.safetensors"))
        assert (len(files) > 1) == (shard_bytes < 10**6)
        for f in files:                                     # exactly the planned size: no page padding left
            header_len = int.from_bytes(f.read_bytes()[:8], "little")
            header = json.loads(f.read_bytes()[8:8 + header_len])
            end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
            assert f.stat().st_size == 8 + header_len + end


def test_writer_falls_back_when_direct_io_is_refused(tmp_path, monkeypatch):
    """tmpfs refuses O_DIRECT at open; other filesystems may refuse a write part-way: same bytes."""
    import errno
    import os
    tensors = _writer_case(seed=1)
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    real_open, real_pwrite = os.open, os.pwrite
    direct_fds: set[int] = set()
    calls = {"n": 0}

    def fake_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        if flags & getattr(os, "O_DIRECT", 0):
            direct_fds.add(fd)
        return fd

    def fake_pwrite(fd, data, offset):
        if fd in direct_fds:
            calls["n"] += 1
            if calls["n"] > 2:                               # refuse from the third direct write on
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    def write_and_check(folder):
        writer = ShardedWriter(folder, layout, direct=True)
        _write_in_blocks(writer, tensors)
        writer.close()
        loaded = load_file(folder / "model.safetensors")
        for k, v in tensors.items():
            assert torch.equal(loaded[k], v), k

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "pwrite", fake_pwrite)
    write_and_check(tmp_path)
    monkeypatch.setattr(os, "open", lambda path, flags, *a: (_ for _ in ()).throw(OSError(errno.EINVAL, "no"))
                        if flags & getattr(os, "O_DIRECT", 0) else real_open(path, flags, *a))
    (tmp_path / "refused").mkdir()
    write_and_check(tmp_path / "refused")


def test_background_writer_error_reaches_the_merge(tmp_path, monkeypatch):
    import mergelab.io.writer as io_module
    tensors = _writer_case(seed=2)
    writer = ShardedWriter(tmp_path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()])

    def broken(self, data, offset):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(io_module._ShardFile, "write", broken)
    with pytest.raises(OSError, match="No space left"):
        for k, v in tensors.items():
            writer.write(k, v)
        writer.close()
    writer.abort()


# ------------------------------------------------------------------ bad input: one line, exit 2, no output

def expect_error(capsys, args, pattern, out_dir=None):
    code = run_cli(*args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("mergelab: error:"), err
    assert pattern in err, err
    if out_dir is not None:
        assert not Path(out_dir).exists()
        assert not list(Path(out_dir).parent.glob(f".{Path(out_dir).name}.tmp-*"))


def test_missing_recipe_and_model(folders, tmp_path, capsys):
    base, models = folders
    expect_error(capsys, ["merge", tmp_path / "nope.yaml", tmp_path / "o"], "recipe file not found")
    recipe = write_recipe(tmp_path / "r.yaml", base, [models[0], tmp_path / "missing"], "ties")
    expect_error(capsys, ["merge", recipe, tmp_path / "o"], "missing: no such file", tmp_path / "o")


def test_unknown_method_and_parameter(folders, tmp_path, capsys):
    base, models = folders
    expect_error(capsys, ["merge", write_recipe(tmp_path / "a.yaml", base, models, "tiez"), tmp_path / "o"],
                 "unknown merge method 'tiez'")
    expect_error(capsys, ["merge", write_recipe(tmp_path / "b.yaml", base, models, "ties", {"lamda": 1}),
                          tmp_path / "o"], "unknown parameter 'lamda'")
    expect_error(capsys, ["merge", write_recipe(tmp_path / "c.yaml", base, models, "ties", None,
                                                [{"density": 1.2}, {}, {}]), tmp_path / "o"],
                 "models[0].parameters: 'density' must be in [0.0, 1.0]")


def test_mismatched_shapes(folders, tmp_path, capsys):
    base, models = folders
    sd = load_state_dict(models[0])
    sd["pooler.dense.weight"] = torch.zeros(16, 32)
    save_file(sd, tmp_path / "bad.safetensors")
    recipe = write_recipe(tmp_path / "r.yaml", base, [tmp_path / "bad.safetensors", models[1]], "ties")
    expect_error(capsys, ["merge", recipe, tmp_path / "o"], "'pooler.dense.weight' has shape [16, 32]", tmp_path / "o")


def test_nan_input_leaves_no_output(folders, tmp_path, capsys):
    base, models = folders
    sd = load_state_dict(models[0])
    sd["encoder.layer.1.output.dense.bias"][3] = float("nan")
    save_file(sd, tmp_path / "nan.safetensors")
    recipe = write_recipe(tmp_path / "r.yaml", base, [tmp_path / "nan.safetensors", models[1]], "task_arithmetic")
    expect_error(capsys, ["merge", recipe, tmp_path / "o"], "'encoder.layer.1.output.dense.bias' contains NaN or Inf",
                 tmp_path / "o")


def test_existing_out_dir_needs_force(folders, tmp_path, capsys):
    base, models = folders
    recipe = write_recipe(tmp_path / "r.yaml", base, models, "task_arithmetic")
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    expect_error(capsys, ["merge", recipe, out], "already exists (use --force")
    assert (out / "keep.txt").exists()
    # a folder mergelab did not write is never replaced, even with --force
    expect_error(capsys, ["merge", recipe, out, "--force"], "not written by mergelab")
    assert (out / "keep.txt").exists()
    out2 = tmp_path / "o2"
    assert run_cli("merge", recipe, out2, "--quiet") == 0
    (out2 / "keep.txt").write_text("x")
    assert run_cli("merge", recipe, out2, "--force", "--quiet") == 0
    assert not (out2 / "keep.txt").exists() and (out2 / "model.safetensors").exists()


def test_corrupt_safetensors_header(folders, tmp_path, capsys):
    base, models = folders
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes((10**9).to_bytes(8, "little") + b"{not json")
    recipe = write_recipe(tmp_path / "r.yaml", base, [bad, models[1]], "ties")
    expect_error(capsys, ["merge", recipe, tmp_path / "o"], "corrupt safetensors header", tmp_path / "o")
    truncated = tmp_path / "trunc.safetensors"
    raw = (models[0] / "model.safetensors").read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2])
    recipe = write_recipe(tmp_path / "r2.yaml", base, [truncated, models[1]], "ties")
    expect_error(capsys, ["merge", recipe, tmp_path / "o"], "truncated or corrupt", tmp_path / "o")


class Evil:
    def __reduce__(self):
        return (print, ("owned",))


def test_bin_with_arbitrary_objects_is_refused(folders, tmp_path, capsys):
    base, models = folders
    sd = load_state_dict(models[0])
    sd["extra"] = Evil()
    torch.save(sd, tmp_path / "evil.bin")
    recipe = write_recipe(tmp_path / "r.yaml", base, [tmp_path / "evil.bin", models[1]], "ties")
    expect_error(capsys, ["merge", recipe, tmp_path / "o"], "refused", tmp_path / "o")
    assert "owned" not in capsys.readouterr().out


def test_bad_yaml_and_empty_slices(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("models: [\n")
    expect_error(capsys, ["merge", tmp_path / "bad.yaml", tmp_path / "o"], "invalid YAML at line")
    (tmp_path / "sl.yaml").write_text("slices: []\nmerge_method: ties\n")
    expect_error(capsys, ["merge", tmp_path / "sl.yaml", tmp_path / "o"], "'slices' must be a non-empty list")


def test_console_script_entry_point(folders, tmp_path):
    base, models = folders
    recipe = write_recipe(tmp_path / "r.yaml", base, models, "ties", {"density": 2})
    proc = subprocess.run([sys.executable, "-m", "mergelab", "merge", str(recipe), str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "density" in proc.stderr


def test_inputs_are_never_modified(tmp_path):
    base, models = make_model_folders(tmp_path / "m", n=2)
    sds = [load_state_dict(p) for p in (base, *models)]
    torch.save(sds[2], tmp_path / "ft.bin")
    before = [{k: v.clone() for k, v in sd.items()} for sd in sds]
    merge_state_dicts(sds[0], sds[1:], "ties", {"density": 0.5})
    merge(write_recipe(tmp_path / "r.yaml", base, [models[0], tmp_path / "ft.bin"], "ties"), tmp_path / "o")
    for sd, ref in zip(sds, before):
        assert all(torch.equal(sd[k], ref[k]) for k in ref)
    assert all(torch.equal(v, sds[2][k]) for k, v in torch.load(tmp_path / "ft.bin", weights_only=True).items())


def test_blocked_streaming_merge_writes_the_same_files(folders, tmp_path):
    base, models = folders
    recipe = write_recipe(tmp_path / "r.yaml", base, models, "ties", {"density": 0.3}, compat="mergekit")
    merge(recipe, tmp_path / "whole")
    merge(recipe, tmp_path / "blocked", block_elements=100, threads=3)
    a, b = load_state_dict(tmp_path / "whole"), load_state_dict(tmp_path / "blocked")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_base_only_integer_buffers_are_copied(folders, tmp_path):
    """Like MiniLM's embeddings.position_ids: in the base file, dropped by save_pretrained of fine-tunes."""
    base, models = folders
    sd = load_state_dict(base)
    sd["embeddings.position_ids"] = torch.arange(32).unsqueeze(0)
    save_file(sd, tmp_path / "base.safetensors")
    merge(write_recipe(tmp_path / "r.yaml", tmp_path / "base.safetensors", models, "ties"), tmp_path / "o")
    assert torch.equal(load_state_dict(tmp_path / "o")["embeddings.position_ids"], sd["embeddings.position_ids"])


def test_output_folder_has_ordinary_permissions(folders, tmp_path):
    import os
    base, models = folders
    merge(write_recipe(tmp_path / "r.yaml", base, models, "average"), tmp_path / "o")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o777 & ~umask
