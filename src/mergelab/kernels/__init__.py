"""Pure tensor math: merge kernels (trims, sign election, disjoint merge, DARE, Model Stock), exact
selection of thresholds, and the SVD kernels of the TSV/Iso family and SMILE.

No I/O, no printing: each function takes and returns tensors, so each step of a method can be tested
alone and composed differently by the paper and mergekit semantics.
"""

from mergelab.kernels.merge import *  # noqa: F401,F403
from mergelab.kernels.merge import __all__ as _merge_all
from mergelab.kernels.select import *  # noqa: F401,F403
from mergelab.kernels.select import __all__ as _select_all

__all__ = [*_merge_all, *_select_all]
