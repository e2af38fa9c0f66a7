"""Passthrough: copy one input's tensor (optionally scaled); the method of frankenmerges (``slices:`` with one
source each, layers stacked and renumbered by the engine).

mergekit 0.1.5 ``merge_methods/passthrough.py`` (ALGORITHMS-2 §13.10). ``out = tensor`` or ``tensor * scale``;
``scale`` (per model, default none) is usually set with a filter, e.g. ``o_proj``/``down_proj`` -> 0 for
"zeroed" duplicated layers. Both semantics are the same.
"""

from __future__ import annotations

from mergelab._lazy import lazy_module
from mergelab.methods.registry import Method, Param, TensorJob, register

torch = lazy_module("torch")


def _passthrough(job: TensorJob) -> torch.Tensor:
    scale = job.model_params[0].get("scale")
    x = job.models[0]
    return x if scale is None else x * scale


register(Method(
    name="passthrough",
    summary="copy the single input's tensor (times scale): frankenmerges with slices",
    reference="mergekit 0.1.5 passthrough",
    formula="out = tensor * scale (scale unset: tensor)",
    params=(Param("scale", float, None, "multiply the tensor (unset: copied unchanged)", per_model=True),),
    merge_tensor=_passthrough, needs_base=False, max_models=1, base_is_input=True,
))
