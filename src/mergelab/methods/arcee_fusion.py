"""Arcee Fusion: keep the other model's changes only where their importance (|change| x the row's KL divergence
of softmaxed weights) is an upper outlier.

mergekit 0.1.5 ``merge_methods/arcee_fusion.py`` (ALGORITHMS-2 §13.8; arcee.ai); both semantics are the same.
```
imp = |m - base| * KL_row,  KL_row = sum_lastdim p log(p/q), p = softmax(m, -1) + 1e-8, q = softmax(base, -1) + 1e-8
Q(q) = sorted(imp)[int(q (n - 1))] (over at most 10^6 entries sampled with replacement when larger)
thr = Q(.5) + 1.5 (Q(.75) - Q(.25)) ; out = base + (m - base) [imp >= thr]
```
No parameters. Its float32 mask promotes the result: under mergekit semantics a half-precision merge without
``out_dtype`` is written in float32, as mergekit writes it. mergekit samples with torch's unseeded generator
above 10^6 entries; mergelab with its seeded
one (tensors that large agree in distribution only). Each tensor is merged whole.
"""

from __future__ import annotations

from mergelab._lazy import lazy_module
from mergelab.methods.registry import Method, Param, TensorJob, register

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")
SAMPLE = 1_000_000


def importance(m: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    diff = (m - base).abs()
    p = F.softmax(m, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    return diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def _arcee_fusion(job: TensorJob) -> torch.Tensor:
    base, m = job.base, job.models[0]
    imp = importance(m, base)
    flat = imp.reshape(-1)
    if flat.numel() > SAMPLE:
        flat = flat[torch.randint(flat.numel(), (SAMPLE,), generator=job.generator(0)).to(flat.device)]
    s, _ = torch.sort(flat)
    idx = (torch.tensor([0.25, 0.5, 0.75]) * (s.numel() - 1)).long().to(s.device)
    q1, median, q3 = s[idx]
    mask = (imp >= median + 1.5 * (q3 - q1)).float()
    return base + (m - base) * mask


register(Method(
    name="arcee_fusion",
    summary="keep the other model's changes whose importance (|change| x row KL) is an upper outlier",
    reference="mergekit 0.1.5 arcee_fusion (arcee.ai)",
    formula="imp = |m - base| KL(softmax m || softmax base) per row; keep where imp >= median + 1.5 IQR",
    params=(Param("seed", int, 0, "seed of the quantile sample of tensors above 10^6 entries"),),
    merge_tensor=_arcee_fusion, max_models=1, chunkable=lambda params, compat: False, float32_result=True,
))
