"""Data-based merges: closed forms or weightings computed from a few hundred examples per task.

``regmean`` (RegMean and RegMean++: Gram matrices of every Linear layer's inputs, closed-form merge)
and ``fisher`` (diagonal Fisher information, Fisher-weighted average). Both work on any
``torch.nn.Module`` whose forward takes the loaders' batches (a Tensor, a tuple or a dict of inputs).
"""
from mergelab.databased.fisher import diagonal_fisher, fisher_merge, fisher_merging
from mergelab.databased.regmean import reduce_non_diagonal, regmean, regmean_merge_linear

__all__ = ["regmean", "regmean_merge_linear", "reduce_non_diagonal", "diagonal_fisher",
           "fisher_merge", "fisher_merging"]
