"""mergelab: merge fine-tunings of one foundation model into one better model."""

from mergelab.engine import MergeSummary, merge, merge_state_dicts
from mergelab.errors import MergelabError
from mergelab.io import load_state_dict, open_checkpoint
from mergelab.methods import get_method, list_methods
from mergelab.recipe import load_recipe
from mergelab import svd_methods as _svd_methods  # noqa: F401,E402  (registers tsv, iso_c, iso_cts)

__all__ = ["merge", "merge_state_dicts", "MergeSummary", "MergelabError", "open_checkpoint", "load_state_dict",
           "load_recipe", "list_methods", "get_method"]
__version__ = "0.1.0"
