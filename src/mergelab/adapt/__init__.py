"""Test-time adaptation of merges: AdaMerging and Concrete subspace learning."""
from mergelab.adapt.adamerging import adamerging
from mergelab.adapt.concrete import concrete_merge, final_mask, sample_mask
from mergelab.adapt.functional import FunctionalModel, MergeSpace, entropy, task_vectors_from
from mergelab.adapt.result import AdaptResult, plot_history

__all__ = ["adamerging", "concrete_merge", "sample_mask", "final_mask", "MergeSpace", "FunctionalModel",
           "entropy", "task_vectors_from", "AdaptResult", "plot_history"]
