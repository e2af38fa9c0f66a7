"""Merge search (``mergelab search``): find the best merge of a recipe's models on validation data.

Optuna proposes trials (TPE, CMA-ES, random, grid); each trial merges in memory from task vectors kept
by its worker and is scored by pluggable objectives; trials run in this process or as Ray tasks.
Nothing heavy is imported here: ``config`` needs only PyYAML and the method registry.
"""
from mergelab.search.config import SearchConfig, load_search_config

__all__ = ["SearchConfig", "load_search_config", "run_search"]


def run_search(*args, **kwargs):
    from mergelab.search.runner import run_search as run
    return run(*args, **kwargs)
