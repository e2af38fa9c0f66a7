"""`mergelab adapt regmean|regmean++|fisher|wemoe` through the real entry point: the written folder equals
the library function's result on the same inputs (tiny real BERTs fine-tuned a few steps), and bad input
is one line on stderr, exit 2, no output folder."""
import json
import shutil

import pytest
import torch

from tests.test_adapt import cli_world  # noqa: F401  (the shared fixture: base, two fine-tunes, --data)

torch.set_num_threads(1)


def _main(argv, capsys):
    from mergelab.cli import main
    try:
        rc = main(argv)
    except SystemExit as e:      # argument errors: argparse exits
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _reference(root):
    """The encoders as the command loads them; the pooler (in no checkpoint: transformers initialises it
    at random) is the base's in every fine-tune, as the command fills it."""
    from transformers import AutoModel
    base = AutoModel.from_pretrained(root / "base", attn_implementation="eager")
    fts = []
    for t in range(2):
        sd = AutoModel.from_pretrained(root / f"ft{t}", attn_implementation="eager").state_dict()
        fts.append({k: base.state_dict()[k].clone() if k.startswith("pooler.") else v for k, v in sd.items()})
    return base, fts


def _texts(data, t):
    return [ln for ln in (data / f"task{t}" / "inputs.txt").read_text().splitlines() if ln.strip()]


def _loaders(tok, data, batch_size=8, seed=0, labelled=False):
    from mergelab.adapt.text import LabelledBatches, ShuffledBatches, tokenize
    out = []
    for t in range(2):
        if labelled:
            rows = [ln.split("\t", 1) for ln in (data / f"task{t}" / "val.tsv").read_text().splitlines() if ln]
            out.append(LabelledBatches(tokenize(tok, [r[1] for r in rows], 16), [int(r[0]) for r in rows],
                                       batch_size, seed + t, 0))
        else:
            out.append(ShuffledBatches(tokenize(tok, _texts(data, t), 16), batch_size, seed + t, 0))
    return out


def _heads(data):
    from mergelab.adapt.text import linear_head
    from mergelab.io.head import load_head_file
    return [linear_head(*load_head_file(data / f"task{t}" / "head.safetensors")) for t in range(2)]


def _assert_written_equals(root, out, merged):
    from mergelab.io import load_state_dict
    saved = load_state_dict(out)
    assert set(saved) == set(load_state_dict(root / "base"))       # the stored tensors, no pooler
    for k, v in saved.items():
        torch.testing.assert_close(v, merged[k], rtol=0, atol=1e-6, msg=k)
    assert not [p for p in out.parent.iterdir() if p.name.startswith("." + out.name)]   # no temp folder left


@pytest.mark.parametrize("method", ["regmean", "regmean++"])
def test_cli_regmean_equals_the_library_and_needs_no_head(cli_world, method, tmp_path, capsys):
    from transformers import AutoModel

    from mergelab.databased import regmean
    root, recipe, data, tok = cli_world
    nohead = tmp_path / "data"
    shutil.copytree(data, nohead)
    for t in range(2):
        (nohead / f"task{t}" / "head.safetensors").unlink()          # RegMean reads inputs only
    out = tmp_path / "out"
    rc, printed, err = _main(["adapt", method, str(recipe), str(out), "--data", str(nohead), "--alpha", "0.9",
                              "--num-examples", "20", "--quiet"], capsys)
    assert rc == 0, err
    assert "examples per task task0=20, task1=20" in printed and "alpha 0.9" in printed
    base, fts = _reference(root)
    want = regmean(base, fts, _loaders(tok, data), alpha=0.9, num_examples=20, plus_plus=method == "regmean++")
    _assert_written_equals(root, out, want)
    doc = json.loads((out / "adapt_result.json").read_text())
    assert doc["config"]["method"] == method and doc["config"]["examples_used"] == [20, 20]
    assert "regmean" in (out / "README.md").read_text().lower() and (out / "tokenizer_config.json").is_file()
    AutoModel.from_pretrained(out, attn_implementation="eager")      # a normal checkpoint
    # fewer inputs than asked: all are used, and a note says so
    rc, printed, err = _main(["adapt", method, str(recipe), str(tmp_path / "all"), "--data", str(nohead),
                              "--quiet"], capsys)
    assert rc == 0 and "task 'task0' has 24 inputs, fewer than --num-examples 256" in err
    assert "task0=24" in printed


@pytest.mark.parametrize("estimator,labels,n", [("batch", False, 16), ("per_example", True, 6)])
def test_cli_fisher_equals_the_library(cli_world, estimator, labels, n, tmp_path, capsys):
    from mergelab.adapt.text import PooledEncoder, prefixed, unprefixed
    from mergelab.databased import fisher_merging
    root, recipe, data, tok = cli_world
    out = tmp_path / "out"
    argv = ["adapt", "fisher", str(recipe), str(out), "--data", str(data), "--estimator", estimator,
            "--num-examples", str(n), "--eps", "1e-5", "--quiet"] + (["--labels"] if labels else [])
    rc, printed, err = _main(argv, capsys)
    assert rc == 0, err
    assert f"fisher ({estimator}, " + ("the labels of val.tsv" if labels else "the model's own predictions") in printed
    base, fts = _reference(root)
    want = fisher_merging(PooledEncoder(base), [prefixed(sd) for sd in fts], _loaders(tok, data, labelled=labels),
                          _heads(data), num_examples=n, estimator=estimator, labeled=labels, eps=1e-5)
    _assert_written_equals(root, out, unprefixed(want))
    doc = json.loads((out / "adapt_result.json").read_text())
    assert doc["config"]["labels"] is labels and doc["config"]["examples_used"] == [n, n]


def test_cli_wemoe_equals_the_library_and_loads_with_load_wemoe(cli_world, tmp_path, capsys):
    from mergelab.adapt.text import PooledEncoder, pad_batch, tokenize
    from mergelab.adapt.wemoe import load_wemoe, parameter_counts, upscale_to_wemoe, wemoe_adapt
    root, recipe, data, tok = cli_world
    out = tmp_path / "out"
    rc, printed, err = _main(["adapt", "wemoe", str(recipe), str(out), "--data", str(data), "--steps", "3",
                              "--lr", "0.01", "--router-hidden-layers", "1", "--quiet"], capsys)
    assert rc == 0, err
    base, fts = _reference(root)
    moe = upscale_to_wemoe(base, fts, router_hidden_layers=1)
    hist = wemoe_adapt(PooledEncoder(moe), _loaders(tok, data, batch_size=8), _heads(data), steps=3, lr=0.01)
    moe.eval()
    loaded = load_wemoe(out)
    a, b = loaded.state_dict(), moe.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if not k.startswith("pooler."):          # the random pooler: neither stored nor used
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    batch = pad_batch(tokenize(tok, ["w1 w2 w3", "w40 w41 w50 w60"], 16))
    with torch.no_grad():
        torch.testing.assert_close(PooledEncoder(loaded)(**batch), PooledEncoder(moe)(**batch), rtol=0, atol=1e-6)
    doc = json.loads((out / "adapt_result.json").read_text())
    assert [round(h["entropy"], 5) for h in doc["history"]] == [round(h["entropy"], 5) for h in hist]
    counts = parameter_counts(loaded)
    assert counts == json.loads((out / "wemoe_config.json").read_text())["parameter_counts"]
    assert f"{counts['router'] / 1e6:.3f} M router" in printed and "x the base" in printed
    assert "entropy" in printed and (out / "history.png").is_file() and (out / "tokenizer_config.json").is_file()
    assert "load_wemoe" in (out / "README.md").read_text()


def _bad(tmp_path, data, edit):
    bad = tmp_path / "bad_data"
    shutil.copytree(data, bad)
    edit(bad)
    return bad


def test_cli_databased_bad_input_is_one_line_exit_2_and_no_output(cli_world, tmp_path, capsys):
    from safetensors.torch import save_file
    root, recipe, data, tok = cli_world
    out = tmp_path / "out"
    cases = [
        (["regmean"], lambda d: (d / "task1" / "inputs.txt").unlink(), "task1/inputs.txt: missing"),
        (["fisher"], lambda d: save_file({"weight": torch.zeros(2, 16)}, str(d / "task0" / "head.safetensors")),
         "'weight' has 16 columns, the encoder's hidden size is 32"),
        (["wemoe"], lambda d: (d / "task0" / "head.safetensors").unlink(), "task0/head.safetensors: missing"),
        (["fisher", "--labels"], lambda d: (d / "task1" / "val.tsv").unlink(), "task1/val.tsv: missing"),
        (["regmean++"], lambda d: (d / "tasks.txt").write_text("task0\n"), "1 task folders for 2 models"),
        (["regmean", "--exclude", "dense("], None, "not a regular expression"),
        (["regmean", "--alpha", "1.5"], None, "alpha must be in [0, 1]"),
        (["fisher", "--estimator", "sampled"], None, "invalid choice: 'sampled'"),
        (["fisher", "--num-examples", "0"], None, "expected a positive integer, got '0'"),
        (["regmean", "--num-examples", "-3"], None, "expected a positive integer, got '-3'"),
        (["wemoe", "--router-hidden-layers", "3"], None, "invalid choice: 3"),
        (["wemoe", "--alpha", "0.5"], None, "unrecognized arguments: --alpha"),
    ]
    for extra, edit, want in cases:
        d = _bad(tmp_path, data, edit) if edit else data
        rc, _, err = _main(["adapt", extra[0], str(recipe), str(out), "--data", str(d), "--quiet", *extra[1:]],
                           capsys)
        assert rc == 2 and want in err, (extra, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert not out.exists(), extra
        if edit:
            shutil.rmtree(d)
    # a recipe parameter of another method is named
    other = tmp_path / "r.yaml"
    other.write_text(recipe.read_text().replace("batch_size: 8", "granularity: layer"))
    rc, _, err = _main(["adapt", "regmean", str(other), str(out), "--data", str(data)], capsys)
    assert rc == 2 and "'granularity' is not an option of 'adapt regmean'" in err and not out.exists()
