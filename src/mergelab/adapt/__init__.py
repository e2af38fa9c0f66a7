"""Test-time adaptation of merges: AdaMerging, Concrete subspace learning and WEMoE routers."""
from mergelab.adapt.adamerging import adamerging
from mergelab.adapt.concrete import concrete_merge, final_mask, sample_mask
from mergelab.adapt.functional import FunctionalModel, MergeSpace, entropy, task_vectors_from
from mergelab.adapt.result import AdaptResult, plot_history
from mergelab.adapt.wemoe import load_wemoe, save_wemoe, upscale_to_wemoe, wemoe, wemoe_adapt

__all__ = ["adamerging", "concrete_merge", "sample_mask", "final_mask", "MergeSpace", "FunctionalModel",
           "entropy", "task_vectors_from", "AdaptResult", "plot_history", "wemoe", "upscale_to_wemoe", "wemoe_adapt",
           "save_wemoe", "load_wemoe"]
