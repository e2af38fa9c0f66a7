"""Every method against a naive whole-model reference, and mergekit semantics against a port of
mergekit 0.1.5's merge_group (argsort-based sparsification, weighted sign vote, weighted mean)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelab import MergelabError, merge_state_dicts
from mergelab import kernels as K
from mergelab.methods import get_method, list_methods


def tiny_models(n=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = {"emb.weight": torch.randn(10, 6, generator=g), "lin.weight": torch.randn(6, 6, generator=g),
            "lin.bias": torch.randn(6, generator=g), "scale": torch.randn((), generator=g),
            "pos_ids": torch.arange(5)}
    models = []
    for _ in range(n):
        models.append({k: (v + 0.1 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone()
                       for k, v in base.items()})
    cast = lambda sd: {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return cast(base), [cast(m) for m in models]


FLOAT_KEYS = ["emb.weight", "lin.weight", "lin.bias", "scale"]


def flat(sd):
    return torch.cat([sd[k].float().reshape(-1) for k in sorted(FLOAT_KEYS)])


def unflat(vec, like):
    out, i = {}, 0
    for k in sorted(FLOAT_KEYS):
        n = like[k].numel()
        out[k] = vec[i:i + n].reshape(like[k].shape)
        i += n
    return out


def naive_ties_global(base, models, k, lam, mode="mean"):
    """The TIES authors' code: flatten the whole model (sorted keys), top-k per task row."""
    tv = torch.stack([flat(m) - flat(base) for m in models])
    d = tv.shape[1]
    thr = torch.kthvalue(tv.abs(), d - int(d * k), dim=1, keepdim=True).values
    tv = tv * (tv.abs() >= thr)
    s = torch.sign(tv.sum(0))
    s[s == 0] = torch.sign(s.sum())
    sel = torch.where(s > 0, tv > 0, tv < 0) * tv
    merged = sel.sum(0) / (sel != 0).sum(0).clamp(min=1) if mode == "mean" else sel.sum(0)
    return unflat(flat(base) + lam * merged, base)


def check_close(out, ref, atol=1e-6):
    for k, v in ref.items():
        assert torch.allclose(out[k].float(), v.float(), atol=atol), k


@pytest.fixture(params=["sampled bracket", "bracket missed", "bracket over its cap"])
def selection_path(request, monkeypatch):
    """Thresholds of large or blocked tensors come from a sampled bracket (one pass); the exact
    histogram passes take over when the sample misled or the bracket holds too many values."""
    import mergelab.engine.streaming as E
    import mergelab.kernels as K
    if request.param == "bracket missed":
        monkeypatch.setattr(K, "sample_bracket", lambda sample, k, n, slack=4.0: (float("inf"), float("inf")))
    elif request.param == "bracket over its cap":
        monkeypatch.setattr(E, "BAND_CAP", 3)
    return request.param


@pytest.mark.parametrize("k,mode", [(0.2, "mean"), (0.5, "sum"), (0.05, "mean")])
def test_ties_global_matches_whole_model_reference(k, mode, selection_path):
    base, models = tiny_models()
    out = merge_state_dicts(base, models, "ties", {"density": k, "lambda": 0.7, "merge": mode})
    check_close(out, naive_ties_global(base, models, k, 0.7, mode))
    assert torch.equal(out["pos_ids"], base["pos_ids"])


def test_ties_global_threads_give_same_result():
    base, models = tiny_models(seed=4)
    a = merge_state_dicts(base, models, "ties", {"density": 0.3}, threads=1)
    b = merge_state_dicts(base, models, "ties", {"density": 0.3}, threads=3)
    for key in a:
        assert torch.equal(a[key], b[key])


def test_task_arithmetic_and_average_reference():
    base, models = tiny_models()
    out = merge_state_dicts(base, models, "task_arithmetic", {"lambda": 0.4},
                            model_params=[{"weight": 2.0}, {}, {}])
    for k in FLOAT_KEYS:
        ref = base[k] + 0.4 * (2 * (models[0][k] - base[k]) + (models[1][k] - base[k]) + (models[2][k] - base[k]))
        assert torch.allclose(out[k], ref, atol=1e-6)
    avg = merge_state_dicts(None, models, "average", model_params=[{"weight": 1.0}, {"weight": 3.0}, {}])
    for k in FLOAT_KEYS:
        assert torch.allclose(avg[k], (models[0][k] + 3 * models[1][k] + models[2][k]) / 5, atol=1e-6)


def test_breadcrumbs_reference():
    base, models = tiny_models()
    out = merge_state_dicts(base, models, "breadcrumbs", {"keep": 0.5, "top_remove": 0.2, "lambda": 0.5})
    for k in FLOAT_KEYS:
        total = torch.zeros_like(base[k])
        for m in models:
            tau = m[k] - base[k]
            if tau.dim() == 0:
                total += tau
                continue
            n = tau.shape[-1]
            order = torch.argsort(tau.abs(), dim=-1, descending=True)
            ranks = torch.argsort(order, dim=-1)
            keep = (ranks >= int(n * 0.2)) & (ranks < int(n * 0.2) + int(n * 0.5))
            total += tau * keep
        assert torch.allclose(out[k], base[k] + 0.5 * total, atol=1e-6), k


def test_dare_is_seeded_and_unbiased():
    base, models = tiny_models(n=2)
    a = merge_state_dicts(base, models, "dare_linear", {"density": 0.5, "seed": 3})
    b = merge_state_dicts(base, models, "dare_linear", {"density": 0.5, "seed": 3}, threads=2)
    c = merge_state_dicts(base, models, "dare_linear", {"density": 0.5, "seed": 4})
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["emb.weight"], c["emb.weight"])
    full = merge_state_dicts(base, models, "dare_linear", {"density": 1.0})
    ta = merge_state_dicts(base, models, "task_arithmetic", {"lambda": 1.0})
    check_close(full, ta)
    ties = merge_state_dicts(base, models, "dare_ties", {"density": 1.0, "merge": "sum"})
    ref = merge_state_dicts(base, models, "ties", {"density": 1.0, "merge": "sum"})
    check_close(ties, ref)


def test_model_stock_needs_two_models():
    base, models = tiny_models(n=2)
    out = merge_state_dicts(base, models, "model_stock")
    assert out["lin.weight"].shape == (6, 6)
    with pytest.raises(MergelabError, match="at least 2"):
        merge_state_dicts(base, models[:1], "model_stock")


# ------------------------------------------------------------------ mergekit 0.1.5 port

def mk_magnitude(t, density):
    if density >= 1:
        return t
    if density <= 0:
        return torch.zeros_like(t)
    k = max(1, int(density * t.numel()))
    mask = torch.zeros(t.numel())
    mask[torch.argsort(t.abs().reshape(-1), descending=True)[:k]] = 1
    return t * mask.reshape(t.shape)


def mk_outliers(t, density, gamma):
    if density >= 1:
        return t
    n = t.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    mask = torch.zeros(n)
    mask[torch.sort(t.abs().reshape(-1)).indices[n_bot:n_bot + target]] = 1
    return t * mask.reshape(t.shape)


def mk_merge_group(base, tensors, weights, sparsify, consensus, normalize, lam):
    deltas = torch.stack([sparsify(t - base) for t in tensors])
    w = torch.tensor(weights).reshape(-1, *([1] * base.dim()))
    deltas = deltas * w
    if consensus:
        sign = deltas.sign()
        majority = (deltas.sum(0) >= 0).float() * 2 - 1
        mask = (sign == majority).float()
        mixed = (deltas * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(0)
        divisor = w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return base + mixed


MK_CASES = [
    ("task_arithmetic", {"lambda": 0.8}, lambda t, d: t, False, False),
    ("ties", {"lambda": 1.0}, lambda t, d: mk_magnitude(t, d["density"]), True, True),
    ("breadcrumbs", {}, lambda t, d: mk_outliers(t, d["density"], d["gamma"]), False, False),
    ("breadcrumbs_ties", {"lambda": 0.9}, lambda t, d: mk_outliers(t, d["density"], d["gamma"]), True, False),
]


@pytest.mark.parametrize("name,params,sparsify,consensus,normalize", MK_CASES)
def test_mergekit_compat_matches_port(name, params, sparsify, consensus, normalize):
    base, models = tiny_models(seed=7)
    per = [{"weight": 0.5, "density": 0.3, "gamma": 0.05}, {"weight": 1.0, "density": 0.6, "gamma": 0.1},
           {"weight": 0.7, "density": 0.5, "gamma": 0.0}]
    keys = {"task_arithmetic": ("weight",), "ties": ("weight", "density")}.get(name, ("weight", "density", "gamma"))
    out = merge_state_dicts(base, models, name, params, [{k: p[k] for k in keys} for p in per], compat="mergekit")
    lam = params.get("lambda", 1.0)
    for k in FLOAT_KEYS:
        ref = mk_merge_group(base[k], [m[k] for m in models], [p["weight"] for p in per],
                             lambda t, _i=iter(per): sparsify(t, next(_i)), consensus, normalize, lam)
        assert torch.allclose(out[k], ref, atol=1e-6), k


@pytest.mark.parametrize("weights,normalize,lam", [([0.5, 1.0, 0.7], False, 0.8), ([1.0, 1.0, 1.0], True, 1.0),
                                                    ([2.0, -1.0, 0.25], True, 0.4)])
def test_mergekit_task_arithmetic_is_one_pass_and_bit_identical(monkeypatch, weights, normalize, lam):
    """Under mergekit semantics task arithmetic reads the inputs in one chunked pass (no task vectors), whole
    tensors and blocks of rows alike, and keeps mergekit's bits."""
    import mergelab.kernels as kernels
    calls = []
    real = kernels.fused_task_arithmetic
    monkeypatch.setattr(kernels, "fused_task_arithmetic", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    base, models = tiny_models(seed=7)
    per = [{"weight": w} for w in weights]
    for block in (8, 1 << 20):
        calls.clear()
        out = merge_state_dicts(base, models, "task_arithmetic", {"lambda": lam, "normalize": normalize}, per,
                                compat="mergekit", block_elements=block)
        for k in FLOAT_KEYS:
            ref = mk_merge_group(base[k], [m[k] for m in models], weights, lambda t: t, False, normalize, lam)
            assert torch.equal(out[k], ref), k
        assert len(calls) >= len(FLOAT_KEYS)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights,lam", [([1.0], 1.0), ([0.5, 1.0], 0.9), ([1.0, 1.0, 1.0], 1.0),
                                         ([2.0, -1.0, 0.25, 1.0], 0.4), ([1.0, -1.0, 0.0], 1.0)])
def test_fused_consensus_mix_keeps_mergekits_bits(normalize, weights, lam):
    """The chunked mix against the port of mergekit's whole-tensor one: sparse deltas (zeros, sums of zero,
    nothing kept), weights negative, zero, summing to zero; chunks far smaller than the tensor."""
    g = torch.Generator().manual_seed(len(weights))
    base = torch.randn(37, 101, generator=g)
    deltas = torch.randint(-2, 3, (len(weights), 37, 101), generator=g).float() / 8
    models = [base + d for d in deltas]
    ref = mk_merge_group(base, models, weights, lambda t: t, True, normalize, lam)
    for chunk in (64, 1000, 1 << 15):
        out = K.fused_consensus_mix(base, K.task_vectors(base, models), weights, normalize, lam, chunk)
        assert torch.equal(out, ref), chunk


def tied_models(seed=3):
    """Deltas on a grid of 8 values, so that many magnitudes tie at every trim cut (as in half precision)."""
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(40, 50, generator=g)}
    models = [{"w": base["w"] + torch.randint(-4, 5, (40, 50), generator=g).float() / 8} for _ in range(3)]
    return base, models


@pytest.mark.parametrize("name,params,per,consensus,normalize", [
    ("ties", {"lambda": 1.0}, {"density": 0.3}, True, True),
    ("breadcrumbs", {}, {"density": 0.4, "gamma": 0.1}, False, False),
    ("breadcrumbs_ties", {}, {"density": 0.4, "gamma": 0.1}, True, False),
])
def test_exact_ties_keeps_mergekits_choice_or_every_tied_entry(name, params, per, consensus, normalize):
    base, models = tied_models()
    pm = [dict(per, weight=1.0) for _ in models]
    if name == "ties":
        sparsify = lambda t: mk_magnitude(t, per["density"])
    else:
        sparsify = lambda t: mk_outliers(t, per["density"], per["gamma"])
    ref = mk_merge_group(base["w"], [m["w"] for m in models], [1.0] * 3, sparsify, consensus, normalize, 1.0)
    exact = merge_state_dicts(base, models, name, params, pm, compat="mergekit")
    assert torch.equal(exact["w"], ref)                                  # mergekit's argsort choice, bit for bit
    loose = merge_state_dicts(base, models, name, dict(params, exact_ties=False), pm, compat="mergekit")
    assert not torch.equal(loose["w"], ref)
    n = base["w"].numel()
    cut = max(1, int(per["density"] * n)) if name == "ties" else int(per["density"] * n)
    assert all(int(_kept_all_tied(m["w"] - base["w"], per).sum()) > cut for m in models)   # ties straddle
    loose_ref = mk_merge_group(base["w"], [m["w"] for m in models], [1.0] * 3,
                               lambda t: t * _kept_all_tied(t, per), consensus, normalize, 1.0)
    assert torch.equal(loose["w"], loose_ref)


def _kept_all_tied(delta, per):
    """The entries a threshold keeps: all magnitudes tied at the cut of mergekit's ``magnitude`` (no ``gamma``)
    or at either cut of its ``magnitude_outliers`` band."""
    mag = delta.abs()
    n = mag.numel()
    s = torch.sort(mag.reshape(-1)).values
    if "gamma" not in per:
        return mag >= s[n - max(1, int(per["density"] * n))]
    target = int(per["density"] * n)
    n_bot = n - target - int(per["gamma"] * n)
    return (mag >= s[n_bot]) & (mag <= s[n_bot + target - 1])


def test_exact_ties_is_a_mergekit_semantics_parameter():
    base, models = tied_models()
    with pytest.raises(MergelabError, match="exact_ties"):
        merge_state_dicts(base, models, "ties", {"exact_ties": False}, compat="paper")


def test_mergekit_mode_rejects_paper_only_params():
    base, models = tiny_models()
    with pytest.raises(MergelabError, match="merge.*mergekit"):
        merge_state_dicts(base, models, "ties", {"merge": "sum"}, compat="mergekit")


def test_mergekit_mode_keeps_the_whole_model_trim():
    """trim_scope: global has a clear meaning under mergekit semantics too: the paper's whole-model top-k."""
    base, models = tiny_models()
    per = [{"density": 0.2}] * len(models)
    glob = merge_state_dicts(base, models, "ties", {"trim_scope": "global"}, per, compat="mergekit")
    paper = merge_state_dicts(base, models, "ties", {"trim_scope": "global", "lambda": 1.0}, per, compat="paper")
    tensor = merge_state_dicts(base, models, "ties", {}, per, compat="mergekit")
    changed = lambda out: sum(int((out[k] != base[k]).sum()) for k in FLOAT_KEYS)
    # the same entries survive the trim as under paper semantics (only the mixing differs)
    assert all(torch.equal(glob[k] != base[k], paper[k] != base[k]) for k in FLOAT_KEYS)
    assert changed(glob) != changed(tensor) or any(not torch.equal(glob[k], tensor[k]) for k in FLOAT_KEYS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_computed_in_float32(dtype):
    base, models = tiny_models(dtype=dtype)
    out = merge_state_dicts(base, models, "ties", {"density": 0.5})
    assert out["lin.weight"].dtype == dtype
    ref = naive_ties_global({k: v.float() if v.is_floating_point() else v for k, v in base.items()},
                            [{k: v.float() if v.is_floating_point() else v for k, v in m.items()} for m in models],
                            0.5, 1.0)
    for k in FLOAT_KEYS:
        assert torch.equal(out[k], ref[k].to(dtype)), k


def test_all_zero_deltas_give_base():
    base, _ = tiny_models()
    same = [dict(base), dict(base)]
    for m in list_methods():
        if m.name == "average":
            continue
        out = merge_state_dicts(base, same[:m.max_models or 2], m.name)
        for k in FLOAT_KEYS:
            assert torch.allclose(out[k], base[k]), (m.name, k)


@pytest.mark.parametrize("params,match", [
    ({"density": 1.5}, r"density.*\[0.0, 1.0\]"),
    ({"densty": 0.5}, "unknown parameter 'densty'"),
    ({"merge": "median"}, "must be one of"),
    ({"lambda": "big"}, "must be a number"),
])
def test_bad_parameters(params, match):
    base, models = tiny_models()
    with pytest.raises(MergelabError, match=match):
        merge_state_dicts(base, models, "ties", params)


def test_unknown_method_lists_available():
    with pytest.raises(MergelabError, match="available: .*ties"):
        get_method("tie")


@pytest.mark.parametrize("compat", ["paper", "mergekit"])
def test_blocked_merge_equals_whole_tensor_merge(compat, selection_path):
    """Large tensors are merged in blocks of rows with whole-tensor thresholds: same result."""
    base, models = tiny_models(seed=12)
    cases = {"average": {}, "task_arithmetic": {}, "ties": {"density": 0.3},
             "breadcrumbs": {"keep": 0.4, "top_remove": 0.1} if compat == "paper" else {"density": 0.4, "gamma": 0.1},
             "breadcrumbs_ties": {"keep": 0.4} if compat == "paper" else {"density": 0.4},
             "model_stock": {}, "model_stock_rows": {"filter_wise": True}}
    if compat == "paper":
        cases["ties_per_tensor"] = {"density": 0.3, "trim_scope": "per_tensor"}
        cases["ties_per_row"] = {"density": 0.3, "trim_scope": "per_row"}
    for name, params in cases.items():
        method = "ties" if name.startswith("ties") else name.replace("_rows", "")
        b = None if method == "average" else base
        whole = merge_state_dicts(b, models, method, params, compat=compat)
        blocked = merge_state_dicts(b, models, method, params, compat=compat, block_elements=8, threads=2)
        for k in whole:
            assert torch.allclose(whole[k], blocked[k], atol=1e-6), (name, k)


def test_dare_mergekit_l1_rescale_matches_the_whole_tensor_norm():
    """mergekit's DARE rescales the dropped delta to the L1 norm of the whole tensor's delta, also
    when the engine merges the tensor in blocks of rows (the norms come from a first pass)."""
    base, models = tiny_models(n=1, seed=13)
    params = {"density": 0.5, "seed": 1}
    for block in (8, 1 << 20):
        out = merge_state_dicts(base, models, "dare_linear", params, compat="mergekit", block_elements=block)
        for k in ("emb.weight", "lin.weight", "lin.bias"):
            dropped, delta = out[k] - base[k], models[0][k] - base[k]
            assert 0.3 < (dropped == 0).float().mean() < 0.7
            assert torch.isclose(dropped.abs().sum(), delta.abs().sum(), rtol=1e-4), (block, k)
    two = tiny_models(n=2, seed=13)
    for name in ("dare_linear", "dare_ties"):
        a = merge_state_dicts(two[0], two[1], name, params, compat="mergekit", block_elements=8)
        b = merge_state_dicts(two[0], two[1], name, params, compat="mergekit", block_elements=8, threads=3)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_parameter_of_the_other_semantics_is_refused_naming_both():
    """Issue 21: the refusal of 'normalize' in paper mode used to say '--compat mergekit'."""
    from mergelab.methods import get_method, resolve_params
    with pytest.raises(MergelabError, match=r"'normalize' for method 'ties' with --compat paper \(it exists only "
                                            r"with --compat mergekit\)"):
        resolve_params(get_method("ties"), {"normalize": True}, [{}], "paper")
    with pytest.raises(MergelabError, match=r"'merge' for method 'ties' with --compat mergekit \(it exists "
                                            r"only with --compat paper\)"):
        resolve_params(get_method("ties"), {"merge": "sum"}, [{}], "mergekit")
    # average's own normalize exists in both semantics (as `mergelab methods` lists it)
    assert resolve_params(get_method("average"), {"normalize": False}, [{}], "paper")[0]["normalize"] is False


# ---------------------------------------------------------------- the fused linear-combination pass
def _per_tensor_reference(method, base, models, params, model_params, compat):
    """The method's own per-tensor function (task vectors, stacking): what the fused pass replaces."""
    from mergelab.methods import TensorJob, resolve_params
    m = get_method(method)
    g, per = resolve_params(m, params, model_params, compat, where=method)
    out = {}
    for k in FLOAT_KEYS:
        b = base[k].float() if m.needs_base else None
        out[k] = m.merge_tensor(TensorJob(k, b, [sd[k].float() for sd in models], g, per, compat))
    return out


@pytest.mark.parametrize("compat", ["paper", "mergekit"])
@pytest.mark.parametrize("method,params,weights", [
    ("task_arithmetic", {"lambda": 0.7}, [1.0, 0.5, 2.0]),
    ("task_arithmetic", {"lambda": 0.6, "normalize": True}, [1.0, 3.0, 0.5]),
    ("average", {}, [1.0, 2.0, 0.25]),
    ("average", {"normalize": False}, [0.2, 0.3, 0.5]),
])
def test_fused_linear_combination_matches_the_per_tensor_path(compat, method, params, weights):
    from mergelab.engine.streaming import _fused_combination
    if compat == "paper" and method == "task_arithmetic":
        params = {"lambda": params["lambda"]}          # normalize is a mergekit-mode parameter
    base, models = tiny_models(seed=21)
    model_params = [{"weight": w} for w in weights]
    m = get_method(method)
    from mergelab.methods import resolve_params
    g, per = resolve_params(m, params, model_params, compat, where=method)
    fused = _fused_combination(m, g, per, compat, torch.device("cpu"), torch.float32)
    # mergekit semantics keep mergekit's own order of operations (bit-identical results): no fused pass
    assert (fused is None) == (compat == "mergekit")
    ref = _per_tensor_reference(method, base, models, params, model_params, compat)
    b = base if m.needs_base else None
    for block in (8, 1 << 20):    # merged in blocks of rows and whole
        out = merge_state_dicts(b, models, method, params, model_params, compat=compat, block_elements=block)
        for k in FLOAT_KEYS:
            torch.testing.assert_close(out[k], ref[k], atol=1e-6, rtol=1e-6)
        assert torch.equal(out["pos_ids"], base["pos_ids"])
    hb, hms = tiny_models(seed=21, dtype=torch.bfloat16)          # bfloat16 inputs, float32 arithmetic
    half = merge_state_dicts(hb if m.needs_base else None, hms, method, params, model_params, compat=compat)
    href = _per_tensor_reference(method, hb, hms, params, model_params, compat)
    for k in FLOAT_KEYS:
        assert half[k].dtype == torch.bfloat16
        torch.testing.assert_close(half[k], href[k].to(torch.bfloat16), atol=1e-2, rtol=1e-2)


def test_fused_pass_is_skipped_where_it_cannot_see_every_input_and_names_bad_inputs():
    from mergelab.engine.streaming import _fused_combination
    from mergelab.methods import resolve_params
    ta = get_method("task_arithmetic")
    g, per = resolve_params(ta, {"lambda": 0.5}, [{}, {}], "paper", where="ta")
    cpu = torch.device("cpu")
    assert _fused_combination(ta, g, per, "paper", cpu, torch.float32) is None     # base coefficient 0
    g1, per1 = resolve_params(ta, {"lambda": 0.25}, [{}, {}], "paper", where="ta")
    assert _fused_combination(ta, g1, per1, "paper", cpu, torch.float32) == (0.5, [0.25, 0.25])
    assert _fused_combination(ta, g1, per1, "paper", cpu, torch.float64) is None
    assert _fused_combination(ta, g1, per1, "paper", torch.device("cuda"), torch.float32) is None
    assert _fused_combination(get_method("ties"), g1, per1, "paper", cpu, torch.float32) is None
    # base coefficient 0 (lambda 1/2, two models): the per-tensor path, still exact
    base, models = tiny_models(n=2, seed=5)
    out = merge_state_dicts(base, models, "task_arithmetic", {"lambda": 0.5})
    for k in FLOAT_KEYS:
        torch.testing.assert_close(out[k], base[k] + 0.5 * (models[0][k] - base[k] + models[1][k] - base[k]))
    # a NaN or Inf in any input is named (the fused pass checks its result, then the inputs)
    for where, value in (("base", float("nan")), (1, float("inf")), (0, float("-inf"))):
        b, ms = tiny_models(n=2, seed=5)
        (b if where == "base" else ms[where])["lin.weight"][2, 3] = value
        label = "base" if where == "base" else f"models\\[{where}\\]"
        with pytest.raises(MergelabError, match=label + r".*'lin.weight' contains NaN or Inf"):
            merge_state_dicts(b, ms, "task_arithmetic", {"lambda": 0.3})
    b, ms = tiny_models(n=2, seed=5)
    ms[1]["lin.bias"][0] = float("nan")
    with pytest.raises(MergelabError, match=r"models\[1\].*'lin.bias' contains NaN or Inf"):
        merge_state_dicts(None, ms, "average", {})


@pytest.mark.parametrize("compat,lam", [("mergekit", 0.3), ("mergekit", 0.0), ("paper", 0.5)])
def test_task_arithmetic_names_a_non_finite_input_from_its_result(compat, lam):
    """The per-tensor kernels check their result instead of every input: a NaN or Inf anywhere still
    reaches it (also with weight 0 or lambda 0, as NaN * 0 is NaN) and is named."""
    for where, value in (("base", float("nan")), (0, float("inf")), (1, float("-inf")), ("base", float("inf"))):
        b, ms = tiny_models(n=2, seed=5)
        (b if where == "base" else ms[where])["lin.weight"][2, 3] = value
        label = "base" if where == "base" else f"models\\[{where}\\]"
        per = [{"weight": 0.0}, {"weight": 1.0}]
        with pytest.raises(MergelabError, match=label + r".*'lin.weight' contains NaN or Inf"):
            merge_state_dicts(b, ms, "task_arithmetic", {"lambda": lam}, per, compat=compat)
    b, ms = tiny_models(n=2, seed=5)                     # finite inputs whose sum overflows: written as mergekit
    ms[0]["lin.bias"][0], ms[1]["lin.bias"][0], b["lin.bias"][0] = 3e38, 3e38, -3e38
    out = merge_state_dicts(b, ms, "task_arithmetic", {"lambda": 1.0}, compat="mergekit")
    assert torch.isinf(out["lin.bias"][0])


def _poisoned(shape, where, value, seed):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(*shape, generator=g)}
    models = [{"w": base["w"] + torch.randint(-3, 4, shape, generator=g).float() / 64} for _ in range(3)]
    sd = base if where == "base" else models[where]
    sd["w"].view(-1)[int(torch.randint(0, sd["w"].numel(), (), generator=g))] = value
    return base, models


@settings(max_examples=60, deadline=None)
@given(method=st.sampled_from(["ties", "breadcrumbs", "breadcrumbs_ties", "task_arithmetic", "dare_ties"]),
       where=st.sampled_from(["base", 0, 1, 2]), value=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
       weights=st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=3, max_size=3),
       densities=st.lists(st.sampled_from([0.0, 0.05, 0.3, 1.0]), min_size=3, max_size=3),
       lam=st.sampled_from([0.0, 1.0]), seed=st.integers(0, 1000))
def test_kernels_that_check_their_result_still_name_every_non_finite_input(method, where, value, weights, densities,
                                                                        lam, seed):
    """ties / breadcrumbs / task arithmetic under mergekit semantics skip the engine's pass over each input and
    look at their result: a NaN or Inf anywhere, whatever the weights, densities or lambda, is still named."""
    base, models = _poisoned((12, 7), where, value, seed)
    per = [{"weight": w} if method == "task_arithmetic" else {"weight": w, "density": d}
           for w, d in zip(weights, densities)]
    params = {} if method == "breadcrumbs" else {"lambda": lam}
    label = "base" if where == "base" else f"models\\[{where}\\]"
    with pytest.raises(MergelabError, match=label + r".*'w' contains NaN or Inf"):
        merge_state_dicts(base, models, method, params, per, compat="mergekit")


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
@pytest.mark.parametrize("where,value", [("base", float("nan")), (1, float("inf")), (2, float("nan"))])
def test_large_tensors_name_non_finite_inputs_through_the_sampled_selection(method, where, value):
    base, models = _poisoned((400, 400), where, value, seed=3)      # past the sampled selection's size
    label = "base" if where == "base" else f"models\\[{where}\\]"
    with pytest.raises(MergelabError, match=label + r".*'w' contains NaN or Inf"):
        merge_state_dicts(base, models, method, {}, [{"weight": 1.0, "density": 0.3}] * 3, compat="mergekit")
