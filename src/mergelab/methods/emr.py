"""EMR-Merging's data-free step (Huang et al., NeurIPS 2024, arXiv 2405.17461; ALGORITHMS.md 7.3, -2.md 15.7).

Elect, per tensor, a unified task vector, then per task a binary mask and one rescaler:

    flag    = sign(sum_t tau_t)  with 0 -> -1
    M_t     = tau_t * flag > 0
    tau_uni = flag * max_t |M_t * tau_t|
    lam_t   = sum_k mean|tau_t[k]|  /  sum_k mean|M_t[k] * tau_uni[k]|
    task t  = theta0 + lam_t * M_t * tau_uni            (needs the task id at inference)

No hyper-parameters and no data. Not a registry method: the result is one unified task vector plus
T masks and T scalars, which ``mergelab.upscale.emr`` writes as a folder and loads per task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from mergelab._lazy import lazy_module
from mergelab.errors import MergelabError

torch = lazy_module("torch")


@dataclass
class EMRResult:
    unified: dict            # name -> tau_uni (float32)
    masks: list[dict]        # per task: name -> bool tensor
    rescalers: list[float]   # per task

    @property
    def num_tasks(self) -> int:
        return len(self.masks)

    def task_vector(self, task: int) -> dict:
        """lam_t * M_t * tau_uni for every tensor (float32)."""
        if not 0 <= task < self.num_tasks:
            raise MergelabError(f"EMR: task id {task} outside 0..{self.num_tasks - 1}")
        lam = self.rescalers[task]
        return {k: u * self.masks[task][k] * lam for k, u in self.unified.items()}

    def task_state_dict(self, base: Mapping, task: int) -> dict:
        """theta0 + lam_t * M_t * tau_uni in the base's dtypes; unmerged tensors from the base."""
        tv = self.task_vector(task)
        return {k: ((v.float() + tv[k]).to(v.dtype) if k in tv else v.clone()) for k, v in base.items()}


def emr_merge(task_vectors: Sequence[Mapping[str, "torch.Tensor"]]) -> EMRResult:
    """Elect, mask and rescale; keys are those of the first task vector (all must have them)."""
    if not task_vectors:
        raise MergelabError("EMR-Merging needs at least one task vector")
    keys = list(task_vectors[0])
    for i, tv in enumerate(task_vectors[1:], 2):
        missing = [k for k in keys if k not in tv]
        if missing:
            raise MergelabError(f"task vector {i} lacks tensor '{missing[0]}'")
    T = len(task_vectors)
    unified, masks = {}, [dict() for _ in range(T)]
    num = torch.zeros(T, dtype=torch.float64)
    den = torch.zeros(T, dtype=torch.float64)
    for k in keys:
        tvs = torch.stack([tv[k].float() for tv in task_vectors])
        flag = torch.where(tvs.sum(0) > 0, 1.0, -1.0)
        m = tvs * flag > 0
        uni = (tvs * m).abs().amax(0) * flag
        unified[k] = uni
        for t in range(T):
            masks[t][k] = m[t]
        if uni.numel():
            num += tvs.abs().reshape(T, -1).mean(1).double()
            den += (uni * m).abs().reshape(T, -1).mean(1).double()
    rescalers = [float(n / d) if d > 0 else 0.0 for n, d in zip(num, den)]
    return EMRResult(unified, masks, rescalers)
