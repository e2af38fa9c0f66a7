"""Model Ratatouille (Ramé et al., ICML 2023): recycle fine-tunings on auxiliary tasks as starting
points of the target fine-tunings, then average them (``mergelab recycle``)."""
from mergelab.recycle.config import RecycleConfig, load_config, sample_hparams
from mergelab.recycle.executor import LocalExecutor, RayExecutor, make_executor
from mergelab.recycle.pipeline import plan_runs, run_job, run_recycle
from mergelab.recycle.soup import SoupResult, greedy_soup, rank_runs, uniform_soup
from mergelab.recycle.store import RunStore

__all__ = ["RecycleConfig", "load_config", "sample_hparams", "LocalExecutor", "RayExecutor", "make_executor",
           "plan_runs", "run_job", "run_recycle", "SoupResult", "greedy_soup", "rank_runs", "uniform_soup",
           "RunStore"]
