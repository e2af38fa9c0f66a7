"""Concrete subspace learning (Tang et al., arXiv 2312.06173; ALGORITHMS.md 6): one shared
relaxed-Bernoulli mask over all task vectors, learned by entropy minimisation, with either
task arithmetic (fixed lambda) or layer-wise/task-wise AdaMerging as the inner merge."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from mergelab.adapt.adamerging import adamerge_loop, check_inputs, check_step, entropy_backward
from mergelab.adapt.functional import Cycle, FunctionalModel, MergeSpace, as_logits, entropy
from mergelab.adapt.result import AdaptResult
from mergelab.errors import MergelabError

MASK_MODES = ("continuous", "discrete", "threshold")


def rescale(m: torch.Tensor) -> torch.Tensor:
    """m / mean(m) per tensor (an all-zero mask stays zero)."""
    mean = m.mean()
    return m / mean if float(mean) > 0 else torch.zeros_like(m)


def sample_mask(logits: Mapping[str, torch.Tensor], temperature: float, generator: torch.Generator | None = None,
                eps: float = 1e-6) -> dict[str, torch.Tensor]:
    """Relaxed Bernoulli rsample, m = sigmoid((log(u/(1-u)) + x) / temperature), rescaled by 1/mean(m)."""
    out = {}
    for k, x in logits.items():
        u = torch.rand(x.shape, generator=generator, device=x.device).clamp(eps, 1 - eps)
        m = torch.sigmoid((torch.log(u) - torch.log1p(-u) + x) / temperature)
        out[k] = m / m.mean()
    return out


def final_mask(logits: Mapping[str, torch.Tensor], mode: str, temperature: float,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The mask used for the result: one continuous sample ("continuous"), a Bernoulli(sigmoid(x))
    draw ("discrete") or sigmoid(x) > 0.5 ("threshold"); always rescaled by 1/mean per tensor."""
    with torch.no_grad():
        if mode == "continuous":
            return {k: m.detach() for k, m in sample_mask(logits, temperature, generator).items()}
        out = {}
        for k, x in logits.items():
            p = torch.sigmoid(x)
            if mode == "discrete":
                m = torch.bernoulli(p, generator=generator)
            elif mode == "threshold":
                m = (p > 0.5).float()
            else:
                raise MergelabError(f"mask must be one of {', '.join(MASK_MODES)}, got '{mode}'")
            out[k] = rescale(m)
        return out


def concrete_merge(model: torch.nn.Module, base_sd: Mapping[str, torch.Tensor],
                   task_vectors: Sequence[Mapping[str, torch.Tensor]], task_loaders: Sequence[Iterable],
                   heads: Sequence[Callable] | None = None, *, inner: str = "task_arithmetic",
                   granularity: str = "layer", steps: int = 2000, lr: float = 1e-3, temperature: float = 0.5,
                   init_logits: float = 0.0, lam: float = 0.3, inner_lr: float = 1e-3, tta_steps: int = 1000,
                   tta_lr: float = 1e-3, clamp: bool = True, mask: str = "continuous",
                   batches_per_task: int = 1, seed: int = 0, progress: Callable[[dict], None] | None = None,
                   eval_fn: Callable[[dict], float] | None = None, eval_every: int = 0,
                   device: str | torch.device | None = None, inner_optimizer: str = "adam",
                   init_mask_logits: Mapping[str, torch.Tensor] | None = None,
                   holdout_loaders: Sequence[Iterable] | None = None, patience: int = 0) -> AdaptResult:
    """Concrete TA (inner="task_arithmetic") or Concrete AdaMerging (inner="adamerging").

    Concrete TA: Adam(lr) on the mask logits x; theta = theta_0 + lam * sum_t tau_t * m / mean(m).
    Concrete AdaMerging (first-order bi-level): each outer step resets the coefficients w to `lam`,
    takes one Adam(inner_lr) step on w with a detached mask sample, then one Adam(lr) step on x
    with w fixed, a fresh mask sample and fresh batches; afterwards the mask is frozen and plain
    AdaMerging (w = lam, Adam(tta_lr), `tta_steps` steps) runs on the masked task vectors.
    mask: "continuous" | "discrete" | "threshold" - how the final mask is drawn.

    Defaults follow the authors' code where the old ones were degenerate: coefficients clamped to
    [0, 1] in both stages (``LayerWiseMergedModel(clamp_weights=True)``), and an inner step that is a
    small step (Adam at 1e-3, or ``inner_optimizer="sgd"``): Adam's first step is +-lr whatever the
    gradient, so at lr 1 every mask step would see coefficients near 1.3 or -0.7. Settings known to be
    degenerate are listed in ``result.config["warnings"]``. ``init_mask_logits`` starts from a given
    mask (e.g. Concrete TA's); with ``patience`` > 0 the mask stage stops once the held-out entropy
    (``holdout_loaders``, unlabelled) or, without them, ``eval_fn``'s accuracy has not improved for
    ``patience`` evaluations (every ``eval_every`` steps), and the best mask is kept.
    """
    warnings = []
    if inner_optimizer not in ("adam", "sgd"):
        raise MergelabError(f"inner_optimizer must be 'adam' or 'sgd', got '{inner_optimizer}'")
    if patience < 0:
        raise MergelabError(f"patience must be >= 0, got {patience}")
    if patience and not eval_every:
        raise MergelabError("patience needs eval_every > 0 (how often the stopping criterion is measured)")
    if patience and holdout_loaders is None and eval_fn is None:
        raise MergelabError("patience needs held-out unlabelled loaders or a validation eval_fn")
    if inner == "adamerging" and inner_optimizer == "adam" and inner_lr > 0.05:
        warnings.append(f"inner_lr {inner_lr} with Adam: its first step is +-{inner_lr} per coefficient whatever "
                        "the gradient, so the mask is learned on degenerate merges; use <= 0.01 or --inner-optimizer sgd")
    if inner == "adamerging" and not clamp:
        warnings.append("clamp off: coefficients may leave [0, 1] (task vectors negated); the authors clamp")
    for name, value in (("lr", lr), ("tta_lr", tta_lr)):
        if value > 0.05:
            warnings.append(f"{name} {value} with Adam moves every mask logit / coefficient by about {value} per "
                            "step: early steps are sign steps; prefer a small lr and more steps")
    if inner not in ("task_arithmetic", "adamerging"):
        raise MergelabError(f"inner must be 'task_arithmetic' or 'adamerging', got '{inner}'")
    if mask not in MASK_MODES:
        raise MergelabError(f"mask must be one of {', '.join(MASK_MODES)}, got '{mask}'")
    if temperature <= 0:
        raise MergelabError(f"temperature must be > 0, got {temperature}")
    space = MergeSpace(base_sd, task_vectors, device=device)
    check_inputs(space, task_loaders, heads)
    if inner == "adamerging":
        space.coefficient_shape(granularity)
    if device is not None:
        model.to(device)
    fm = FunctionalModel(model, space, device=device)
    cycles = [Cycle(ld, f"data loader {t + 1}") for t, ld in enumerate(task_loaders)]
    dev = next(iter(space.base.values())).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    logits = {k: torch.full(v.shape, float(init_logits), device=dev, requires_grad=True) for k, v in space.base.items()}
    if init_mask_logits is not None:
        missing = sorted(set(logits) - set(init_mask_logits))
        if missing:
            raise MergelabError(f"init_mask_logits has no logits for {missing[0]!r}")
        for k, x in logits.items():
            start = init_mask_logits[k]
            if tuple(start.shape) != tuple(x.shape):
                raise MergelabError(f"init_mask_logits[{k!r}] has shape {tuple(start.shape)}, expected {tuple(x.shape)}")
            if not bool(torch.isfinite(start).all()):
                raise MergelabError(f"init_mask_logits[{k!r}] is not finite")
            with torch.no_grad():
                x.copy_(start.to(x.device, x.dtype))
    holdout = [Cycle(ld, f"held-out loader {t + 1}") for t, ld in enumerate(holdout_loaders or [])]
    if holdout and len(holdout) != space.num_tasks:
        raise MergelabError(f"{space.num_tasks} task vectors but {len(holdout)} held-out loaders")
    best = {"score": None, "logits": None, "step": 0, "since": 0}
    meta_opt = torch.optim.Adam(list(logits.values()), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    history: list[dict] = []
    was_training = model.training
    model.eval()
    try:
        if inner == "task_arithmetic":
            coeffs = torch.full((space.num_tasks,), float(lam), device=dev)
        else:
            w = torch.full(space.coefficient_shape(granularity), float(lam), device=dev, requires_grad=True)
            inner_opt = (torch.optim.Adam([w], lr=inner_lr, betas=(0.9, 0.999), weight_decay=0.0)
                         if inner_optimizer == "adam" else torch.optim.SGD([w], lr=inner_lr))

            def w_eff():
                return w.clamp(0.0, 1.0) if clamp else w
        for i in range(steps):
            t0 = time.perf_counter()
            rec = {"step": i + 1, "stage": "mask"}
            if inner == "task_arithmetic":
                m = sample_mask(logits, temperature, gen)
                meta_opt.zero_grad()
                loss, per_task = entropy_backward(fm, space.params(coeffs, m), cycles, heads, batches_per_task)
            else:
                with torch.no_grad():
                    w.fill_(float(lam))
                m = {k: v.detach() for k, v in sample_mask(logits, temperature, gen).items()}
                inner_opt.zero_grad()
                _, per_in = entropy_backward(fm, space.params(w_eff(), m), cycles, heads, batches_per_task)
                inner_opt.step()
                rec["inner_entropy"] = sum(per_in) / len(per_in)
                m = sample_mask(logits, temperature, gen)
                meta_opt.zero_grad()
                loss, per_task = entropy_backward(fm, space.params(w_eff().detach(), m), cycles, heads,
                                                  batches_per_task)
            meta_opt.step()
            rec.update({"loss": loss, "entropy": sum(per_task) / len(per_task),
                        "entropy_per_task": per_task, "seconds": time.perf_counter() - t0})
            measure = eval_every and ((i + 1) % eval_every == 0 or i + 1 == steps)
            if measure and (eval_fn is not None or holdout):
                with torch.no_grad():
                    em = final_mask(logits, mask, temperature, torch.Generator(device=dev).manual_seed(seed + 1))
                c = coeffs if inner == "task_arithmetic" else torch.full_like(w, float(lam)).clamp(
                    *((0.0, 1.0) if clamp else (None, None)))
                if eval_fn is not None:
                    rec["val_accuracy"] = float(eval_fn(space.state_dict(c, em)))
                if holdout:
                    with torch.no_grad():
                        per = [float(entropy(as_logits(fm(space.params(c, em), next(cyc),
                                                          None if heads is None else heads[t]))))
                               for t, cyc in enumerate(holdout)]
                    rec["holdout_entropy"] = sum(per) / len(per)
                score = -rec["holdout_entropy"] if holdout else rec.get("val_accuracy")
                if patience and score is not None:
                    if best["score"] is None or score > best["score"]:
                        best.update(score=score, step=i + 1, since=0,
                                    logits={k: v.detach().clone() for k, v in logits.items()})
                    else:
                        best["since"] += 1
            history.append(rec)
            check_step(rec, logits, None if inner == "task_arithmetic" else w)
            if progress is not None:
                progress(rec)
            if patience and best["since"] >= patience:
                rec["early_stop"] = True
                break
        if patience and best["logits"] is not None:
            with torch.no_grad():
                for k, v in logits.items():
                    v.copy_(best["logits"][k])
        fmask = final_mask(logits, mask, temperature, gen)
        if inner == "adamerging":
            coeffs = adamerge_loop(fm, space, cycles, heads, granularity=granularity, steps=tta_steps, lr=tta_lr,
                                   init=lam, clamp=clamp, batches_per_task=batches_per_task, mask=fmask,
                                   progress=progress, eval_fn=eval_fn, eval_every=eval_every, history=history,
                                   stage="tta", step_offset=steps)
    finally:
        model.train(was_training)
    config = {"method": "concrete_" + inner, "granularity": granularity if inner == "adamerging" else "task",
              "steps": steps, "lr": lr, "temperature": temperature, "init_logits": init_logits, "lam": lam,
              "inner_lr": inner_lr, "tta_steps": tta_steps if inner == "adamerging" else 0, "tta_lr": tta_lr,
              "clamp": clamp, "mask": mask, "batches_per_task": batches_per_task, "seed": seed,
              "inner_optimizer": inner_optimizer, "patience": patience, "best_mask_step": best["step"],
              "mask_steps_run": sum(1 for r in history if r.get("stage") == "mask"),
              "started_from_mask": init_mask_logits is not None, "warnings": warnings}
    return AdaptResult(space.state_dict(coeffs, fmask), coeffs.detach().cpu(), list(space.keys),
                       {k: v.cpu() for k, v in fmask.items()}, history, config,
                       mask_logits={k: v.detach().cpu() for k, v in logits.items()})
