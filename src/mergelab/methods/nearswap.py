"""NearSwap: move the base toward the other model by at most ``t`` per entry (entries closer than t are
swapped to the other model's).

mergekit 0.1.5 ``merge_methods/nearswap.py`` (ALGORITHMS-2 §13.7;
huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001);
both semantics are the same.
```
w = clamp(t / max(|base - m|, 1e-6), 0, 1) ; out = w m + (1 - w) base
```
``t`` is required in mergekit. Element-wise: merged in blocks of rows like the other element-wise methods.
"""

from __future__ import annotations

from mergelab._lazy import lazy_module
from mergelab.methods.registry import Method, Param, TensorJob, register

torch = lazy_module("torch")


def _nearswap(job: TensorJob) -> torch.Tensor:
    a, b = job.base, job.models[0]
    w = (job.params["t"] / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return w * b + (1 - w) * a


register(Method(
    name="nearswap",
    summary="take the other model's entry where it is within t of the base's, else step t toward it",
    reference="mergekit 0.1.5 nearswap (alchemonaut/QuartetAnemoi-70B-t0.0001)",
    formula="w = clamp(t / |base - m|, 0, 1); out = w m + (1 - w) base",
    params=(Param("t", float, 0.001, "largest step per entry (mergekit: required)", low=0.0),),
    merge_tensor=_nearswap, max_models=1,
))
