"""SMILE rows of the benchmark: one upscaled model per (k, gate_k) setting, built from the model pool."""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from mergelab.bench.suite import MethodSpec
from mergelab.errors import MergelabError
from mergelab.upscale.smile import upscale_to_smile

BENCH_SETTINGS = ((32, 16), (8, 4), (128, 16), (-1, 16))


def bench_builder(models: Any, tasks: Any, params: dict[str, Any]) -> nn.Module:
    """``mergelab bench`` model builder: one SMILE encoder from the pool's base and fine-tunes.

    ``models`` is the bench ModelPool (``base`` encoder, ``finetuned`` task -> state dict);
    ``params`` may hold k, gate_k, top_k, target_modules, average_experts, routing_use_diff,
    full_svd.  The experts follow the order of ``tasks.names``; no task id is used at test time.
    """
    known = {"k", "gate_k", "top_k", "target_modules", "average_experts", "routing_use_diff", "full_svd"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise MergelabError(f"SMILE bench builder: unknown parameter {unknown[0]!r}")
    sds = [models.finetuned[n] for n in tasks.names]
    model = upscale_to_smile(models.base, sds, **params)
    return model.eval()


def bench_methods(settings: Sequence[tuple[int, int]] = BENCH_SETTINGS, **fixed: Any) -> list:
    """One ``MethodSpec`` row per (k, gate_k) setting, named ``smile_k{k}_g{gate_k}``.

    Register with e.g. ``suite.methods += mergelab.bench.smile_methods.bench_methods()``.
    """
    return [MethodSpec(f"smile_k{'dense' if k == -1 else k}_g{g}", builder=bench_builder,
                       params={"k": k, "gate_k": g, **fixed}) for k, g in settings]
