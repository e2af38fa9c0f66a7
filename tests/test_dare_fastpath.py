"""The streamlined DARE-TIES / consensus path gives the same bits as the straightforward formulas, checks
its inputs through its L1 norms, and builds task vectors one model at a time; DELLA's integer masks."""

from __future__ import annotations

import pytest
import torch

from mergelab import kernels as K
from mergelab.engine.streaming import _Inputs, merge_state_dicts, row_blocks
from mergelab.errors import MergelabError
from mergelab.io import open_checkpoint
from mergelab.methods import TensorJob


@pytest.mark.parametrize("rows", range(1, 9))
def test_stack_sum_is_bit_identical_to_sum_dim0(rows):
    g = torch.Generator().manual_seed(rows)
    stacked = torch.randn(rows, 37, 53, generator=g) * torch.rand(rows, 1, 1, generator=g) * 100
    assert torch.equal(K.stack_sum(stacked), stacked.sum(dim=0))
    assert torch.equal(K.stack_sum(stacked[:, :, ::2]), stacked[:, :, ::2].sum(dim=0))


def _l1(t: torch.Tensor) -> torch.Tensor:
    """The L1 norm in the documented order, written plainly: lane i mod 65536 takes entry i, then all
    65536 lanes are folded in halves."""
    lanes = torch.zeros(1 << 16)
    for chunk in t.abs().reshape(-1).split(1 << 16):
        lanes[:len(chunk)] += chunk
    while len(lanes) > 1:
        lanes = lanes[:len(lanes) // 2] + lanes[len(lanes) // 2:]
    return lanes[0]


def _reference_dare_ties(base, models, name, model_params, params, blocks):
    """mergekit dare_ties as it was written before the fast path: whole-tensor L1 norms, masks per block,
    sign of the weighted sum (0 -> +), kept-weight divisor with the amax fix, base + lambda * mix."""
    spans = blocks or [None]
    sl = (lambda r: slice(None)) if blocks is None else (lambda r: slice(r[0], r[1]))

    def job(r):
        return TensorJob(name, base[sl(r)], [m[sl(r)] for m in models], params, model_params, "mergekit", rows=r)

    norms = torch.zeros(2 * len(models), dtype=torch.float64)
    for r in spans:
        for i, (m, p) in enumerate(zip(models, model_params)):
            d = m[sl(r)] - base[sl(r)]
            norms[2 * i] += _l1(d).double()
            kept = K.dare(d.clone(), 1 - p["density"], job(r).generator(i), rescale="none")
            norms[2 * i + 1] += _l1(kept).double()
    out = []
    w = torch.tensor([p["weight"] for p in model_params])
    for r in spans:
        ds = []
        for i, (m, p) in enumerate(zip(models, model_params)):
            d = K.dare(m[sl(r)] - base[sl(r)], 1 - p["density"], job(r).generator(i), rescale="none")
            before, after = (float(norms[2 * i]), float(norms[2 * i + 1])) if blocks else \
                (float(_l1(m - base)), float(_l1(d)))
            if 0 < p["density"] < 1 and before >= 1e-7 and after >= 1e-7:
                d = d * (before / after)
            ds.append(d)
        deltas = torch.stack(ds) * w.reshape(-1, *([1] * base.dim()))
        sign = torch.sign(deltas.sum(dim=0)).add_(0.5).sign_()
        agreeing = (deltas * sign).clamp(min=0)
        mixed = agreeing.sum(dim=0) * sign
        mask = agreeing.sign()
        divisor = torch.tensordot(w, mask, dims=1)
        divisor = divisor + (1 - mask.amax(dim=0))
        if params["normalize"]:
            mixed = mixed / divisor
        out.append(base[sl(r)] + mixed * params["lambda"])
    return torch.cat(out) if blocks else out[0]


@pytest.mark.parametrize("block", [None, 64 * 10])
@pytest.mark.parametrize("normalize", [False, True])
def test_dare_ties_mergekit_matches_the_reference_bit_for_bit(block, normalize):
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(64, 40, generator=g)}
    models = [{"w": base["w"] + 0.01 * torch.randn(64, 40, generator=g)} for _ in range(3)]
    mp = [{"weight": w, "density": d} for w, d in ((1.0, 0.5), (0.5, 0.3), (2.0, 1.0))]
    params = {"lambda": 0.7, "normalize": normalize, "seed": 5, "rescale": True}
    out = merge_state_dicts(base, models, "dare_ties", params, mp, compat="mergekit",
                            block_elements=block or (1 << 22))["w"]
    full_mp = [dict(p) for p in mp]
    blocks = row_blocks((64, 40), block) if block else None
    assert (blocks is not None) == (block is not None)
    ref = _reference_dare_ties(base["w"], [m["w"] for m in models], "w", full_mp, params, blocks)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("block", [None, 64 * 8])
def test_dare_ties_names_a_nan_even_where_the_mask_drops_it(block):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 32, generator=g)}
    models = [{"w": base["w"] + 0.01 * torch.randn(64, 32, generator=g)} for _ in range(2)]
    models[1]["w"][40, 3] = float("nan")
    # density 0 drops every entry: the NaN cannot reach the result, only the L1 norm sees it
    mp = [{"density": 0.5}, {"density": 0.0}]
    with pytest.raises(MergelabError, match=r"models\[1\].*NaN or Inf"):
        merge_state_dicts(base, models, "dare_ties", {"seed": 1}, mp, compat="mergekit",
                          block_elements=block or (1 << 22))


def test_task_vectors_are_built_one_model_at_a_time_with_the_same_values():
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(12, 5, generator=g)}
    models = [{"w": torch.randn(12, 5, generator=g)} for _ in range(3)]
    inputs = _Inputs(open_checkpoint(base), [open_checkpoint(m) for m in models], ["a", "b", "c"], "base",
                     torch.device("cpu"), torch.float32)
    b = inputs._load(inputs.base, "w", "base", (2, 9), True)
    stacked = inputs.task_vectors("w", (2, 9), b)
    assert torch.equal(stacked, K.task_vectors(base["w"][2:9], [m["w"][2:9] for m in models]))


def test_task_vector_methods_get_no_model_inputs(monkeypatch):
    from mergelab.methods import get_method
    from mergelab.methods import registry
    seen = []
    method = get_method("dare_ties")
    assert method.task_vectors_only
    original = method.merge_tensor

    def spy(job):
        seen.append((len(job.models), job.stacked is not None))
        return original(job)
    monkeypatch.setattr(registry, "get_method", lambda name: registry.Method(**{**method.__dict__, "merge_tensor": spy}))
    import mergelab.engine.streaming as S
    monkeypatch.setattr(S, "get_method", registry.get_method)
    base = {"w": torch.randn(16, 8)}
    models = [{"w": torch.randn(16, 8)} for _ in range(2)]
    merge_state_dicts(base, models, "dare_ties", {}, compat="mergekit", block_elements=32)
    assert seen and all(s == (0, True) for s in seen)


def test_keep_with_probabilities_matches_each_entrys_probability():
    n = 400_000
    probs = torch.linspace(0.05, 0.95, n)
    delta = torch.randn(n, generator=torch.Generator().manual_seed(0)).add_(10.0)    # no zeros
    kept = K.keep_with_probabilities_(delta.clone(), probs, torch.Generator().manual_seed(7)) != 0
    # 5 sigma of a binomial fraction over each of 8 bands of probabilities, and over everything
    for band in torch.arange(n).chunk(8):
        p = float(probs[band].mean())
        assert abs(float(kept[band].float().mean()) - p) < 5 * (p * (1 - p) / len(band)) ** 0.5
    assert abs(float(kept.float().mean()) - float(probs.mean())) < 5 * (0.25 / n) ** 0.5


def test_keep_with_probabilities_is_reproducible_for_a_seed_and_exact_at_0_and_1():
    delta = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    probs = torch.rand(5000, generator=torch.Generator().manual_seed(2))
    a = K.keep_with_probabilities_(delta.clone(), probs, torch.Generator().manual_seed(3))
    b = K.keep_with_probabilities_(delta.clone(), probs, torch.Generator().manual_seed(3))
    c = K.keep_with_probabilities_(delta.clone(), probs, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[a != 0], delta[a != 0])          # kept values untouched
    assert not K.keep_with_probabilities_(delta.clone(), torch.zeros(5000), None).any()
    ones = torch.ones(5000)
    # p = 1 keeps each entry with probability 1 - 2^-31: all of 5000 here
    assert torch.equal(K.keep_with_probabilities_(delta.clone(), ones, torch.Generator().manual_seed(3)), delta)
    # the non-float32 path draws the same mask
    d64 = K.keep_with_probabilities_(delta.double(), probs, torch.Generator().manual_seed(3))
    assert torch.equal(d64 != 0, a != 0)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_kept_fraction_follows_the_magprune_probabilities(method):
    from mergelab.methods.della import magprune_probabilities
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(256, 512, generator=g)}
    models = [{"w": base["w"] + torch.randn(256, 512, generator=g)}]
    params = {"seed": 3, "rescale": False, "normalize": False}
    mp = [{"density": 0.4, "epsilon": 0.3}]
    out = merge_state_dicts(base, models, method, params, mp, compat="mergekit")["w"]
    again = merge_state_dicts(base, models, method, params, mp, compat="mergekit", block_elements=256 * 64)["w"]
    kept = out != base["w"]
    delta = models[0]["w"] - base["w"]
    probs = magprune_probabilities(delta, 0.4, 0.3)
    assert abs(float(kept.float().mean()) - 0.4) < 0.005
    small, large = probs < 0.4, probs >= 0.4       # lower and upper half of the ranks in each row
    assert abs(float(kept[small].float().mean()) - float(probs[small].mean())) < 0.01
    assert abs(float(kept[large].float().mean()) - float(probs[large].mean())) < 0.01
    assert torch.equal(out[kept], models[0]["w"][kept])           # no rescale: kept deltas unchanged
    assert abs(float((again != base["w"]).float().mean()) - 0.4) < 0.005   # blocks: other masks, same rate


@pytest.mark.parametrize("shape", [(7,), (1,), (3, 1), (64, 40), (5, 6, 7)])
def test_magprune_ranks_by_scatter_equal_mergekits_double_argsort(shape):
    from mergelab.methods.della import magprune_probabilities
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    x.view(-1)[::3] = 0.0                                   # ties
    y = x.unsqueeze(0) if x.dim() < 2 else x
    ranks = torch.argsort(torch.argsort(y.abs(), dim=1), dim=1).to(torch.float32) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rn = ((ranks - lo) / torch.where(hi - lo > 0, hi - lo, 1)).clamp(0, 1)
    assert torch.equal(magprune_probabilities(x, 0.5, 0.2), ((0.5 - 0.2) + rn * 2 * 0.2).reshape(x.shape))
