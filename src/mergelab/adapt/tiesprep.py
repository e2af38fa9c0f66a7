"""Task vectors for AdaMerging++: TIES-trimmed (global top-k per task, TIES-code semantics), then
only the entries agreeing with the elected (mass) sign are kept, separately for each task."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mergelab import kernels
from mergelab.errors import MergelabError


def ties_select(task_vectors: Sequence[Mapping[str, torch.Tensor]], density: float) -> list[dict[str, torch.Tensor]]:
    """tau_t -> trim(tau_t, density over the whole flattened task vector) * [sign agrees with elected sign]."""
    if not 0 < density <= 1:
        raise MergelabError(f"ties_trim (keep fraction) must be in (0, 1], got {density}")
    keys = sorted(task_vectors[0])
    flat = torch.stack([torch.cat([tv[k].float().reshape(-1) for k in keys]) for tv in task_vectors])
    for t in range(flat.shape[0]):
        flat[t] = kernels.ties_trim(flat[t], density)
    sign = kernels.elect_sign(flat)
    flat *= torch.where(sign > 0, flat > 0, flat < 0)
    offset = 0
    sizes = [task_vectors[0][k].numel() for k in keys]
    out = [{} for _ in task_vectors]
    for k, n in zip(keys, sizes):
        for t in range(len(task_vectors)):
            out[t][k] = flat[t, offset:offset + n].reshape(task_vectors[t][k].shape).clone()
        offset += n
    return out
