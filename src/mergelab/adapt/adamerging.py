"""AdaMerging (Yang et al., ICLR 2024; ALGORITHMS.md 7.2): learn task-wise or layer-wise merge
coefficients by minimising the prediction entropy of the merged model on unlabelled inputs."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from mergelab.adapt.functional import Cycle, FunctionalModel, MergeSpace, as_logits, entropy
from mergelab.adapt.result import AdaptResult
from mergelab.errors import MergelabError


def check_inputs(space: MergeSpace, task_loaders: Sequence[Iterable], heads: Sequence[Callable] | None) -> None:
    if len(task_loaders) != space.num_tasks:
        raise MergelabError(f"{space.num_tasks} task vectors but {len(task_loaders)} data loaders")
    if heads is not None and len(heads) != space.num_tasks:
        raise MergelabError(f"{space.num_tasks} task vectors but {len(heads)} heads")


def check_step(rec: Mapping, *learned: torch.Tensor | Mapping[str, torch.Tensor] | None) -> None:
    """Stop (one line, no output) when a step's loss or entropy, or a learned tensor, is not finite:
    everything after it would be NaN too."""
    import math
    for key in ("loss", "entropy", "inner_entropy"):
        v = rec.get(key)
        if v is not None and not math.isfinite(float(v)):
            raise MergelabError(f"{rec.get('stage', 'adapt')} step {rec.get('step')}: the {key} became {v} "
                                "(non-finite); try a smaller --lr, or check the inputs and heads")
    for t in learned:
        tensors = t.values() if isinstance(t, Mapping) else [t]
        for x in tensors:
            if x is not None and not bool(torch.isfinite(x.detach()).all()):
                raise MergelabError(f"{rec.get('stage', 'adapt')} step {rec.get('step')}: the learned "
                                    "coefficients or mask became non-finite; try a smaller --lr")


def entropy_backward(fm: FunctionalModel, params: Mapping[str, torch.Tensor], cycles: Sequence[Cycle],
                     heads: Sequence[Callable] | None, batches_per_task: int) -> tuple[float, list[float]]:
    """Backpropagate the summed (over tasks and batches) batch-mean entropy into whatever `params`
    depends on (coefficients, mask logits). Returns the loss and the per-task mean entropies.

    Each batch is run and backpropagated on its own into detached copies of the merged tensors;
    their accumulated gradient then flows once through the merge. Same gradient as one backward of
    the summed loss, but only one batch's activations are held at a time.
    """
    leaves = {k: v.detach().requires_grad_(v.requires_grad) for k, v in params.items()}
    total, per_task = 0.0, []
    for t, cyc in enumerate(cycles):
        task_loss = 0.0
        for _ in range(batches_per_task):
            loss = entropy(as_logits(fm(leaves, next(cyc), None if heads is None else heads[t])))
            if loss.requires_grad:
                loss.backward()
            task_loss += float(loss.detach())
        total += task_loss
        per_task.append(task_loss / batches_per_task)
    outs = [(params[k], leaves[k].grad) for k in params if leaves[k].grad is not None]
    if outs:
        torch.autograd.backward([o for o, _ in outs], [g for _, g in outs])
    return total, per_task


def _evaluate(eval_fn, space, coeffs, mask):
    return float(eval_fn(space.state_dict(coeffs, mask)))


def adamerge_loop(fm: FunctionalModel, space: MergeSpace, cycles: Sequence[Cycle], heads, *, granularity: str, steps: int,
                  lr: float, init: float, clamp: bool, batches_per_task: int,
                  mask: Mapping[str, torch.Tensor] | None = None, progress=None, eval_fn=None,
                  eval_every: int = 0, history: list | None = None, stage: str = "adamerging",
                  step_offset: int = 0) -> torch.Tensor:
    """Adam on the coefficients (optionally clamped to [0, 1] in the forward pass, as the authors
    do); one optimizer step per iteration on the summed entropy. Returns the final (clamped)
    coefficients."""
    raw = torch.full(space.coefficient_shape(granularity), float(init), device=next(iter(space.base.values())).device,
                     requires_grad=True)
    opt = torch.optim.Adam([raw], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    history = [] if history is None else history

    def coeffs():
        return raw.clamp(0.0, 1.0) if clamp else raw

    if eval_fn is not None:
        history.append({"step": step_offset, "stage": stage, "val_accuracy": _evaluate(eval_fn, space, coeffs(), mask)})
    for i in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss, per_task = entropy_backward(fm, space.params(coeffs(), mask), cycles, heads, batches_per_task)
        opt.step()
        rec = {"step": step_offset + i + 1, "stage": stage, "loss": loss,
               "entropy": sum(per_task) / len(per_task), "entropy_per_task": per_task,
               "seconds": time.perf_counter() - t0}
        if eval_fn is not None and eval_every and ((i + 1) % eval_every == 0 or i + 1 == steps):
            rec["val_accuracy"] = _evaluate(eval_fn, space, coeffs(), mask)
        history.append(rec)
        check_step(rec, raw)
        if progress is not None:
            progress(rec)
    return coeffs().detach()


def adamerging(model: torch.nn.Module, base_sd: Mapping[str, torch.Tensor],
               task_vectors: Sequence[Mapping[str, torch.Tensor]], task_loaders: Sequence[Iterable],
               heads: Sequence[Callable] | None = None, *, granularity: str = "layer", steps: int = 500,
               lr: float = 1e-3, init: float = 0.3, clamp: bool = True, ties_trim: float | None = None,
               batches_per_task: int = 2, progress: Callable[[dict], None] | None = None,
               eval_fn: Callable[[dict], float] | None = None, eval_every: int = 0,
               device: str | torch.device | None = None) -> AdaptResult:
    """AdaMerging: theta = theta_0 + sum_t lambda_t(,k) tau_t(,k), lambda learned by entropy minimisation.

    model: any nn.Module whose state-dict names match `base_sd`; its forward (then `heads[t]`)
    gives logits. task_loaders[t] yields unlabelled batches of task t (re-iterated when exhausted).
    granularity: "task" (one coefficient per task) or "layer" (one per tensor and task).
    ties_trim: keep-fraction (e.g. 0.2) for AdaMerging++, where each task vector is replaced by
    its TIES-trimmed entries that agree with the elected sign.
    eval_fn(state_dict) -> average validation accuracy, recorded every `eval_every` steps.
    """
    if ties_trim is not None:
        from mergelab.adapt.tiesprep import ties_select
        task_vectors = ties_select(task_vectors, ties_trim)
    space = MergeSpace(base_sd, task_vectors, device=device)
    check_inputs(space, task_loaders, heads)
    space.coefficient_shape(granularity)
    if device is not None:
        model.to(device)
    fm = FunctionalModel(model, space, device=device)
    cycles = [Cycle(ld, f"data loader {t + 1}") for t, ld in enumerate(task_loaders)]
    was_training = model.training
    model.eval()  # entropy of the deterministic model: no dropout
    history: list[dict] = []
    try:
        coeffs = adamerge_loop(fm, space, cycles, heads, granularity=granularity, steps=steps, lr=lr, init=init,
                               clamp=clamp, batches_per_task=batches_per_task, progress=progress,
                               eval_fn=eval_fn, eval_every=eval_every, history=history)
    finally:
        model.train(was_training)
    config = {"method": "adamerging++" if ties_trim is not None else "adamerging", "granularity": granularity,
              "steps": steps, "lr": lr, "init": init, "clamp": clamp, "ties_trim": ties_trim,
              "batches_per_task": batches_per_task}
    return AdaptResult(space.state_dict(coeffs), coeffs.cpu(), list(space.keys), None, history, config)
