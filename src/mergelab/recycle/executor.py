"""Where the fine-tunings run: one after another in this process, or in parallel on Ray.

Both executors call the same picklable job function with the same job dicts; results come back as
they finish so that the caller can show per-run progress.  Ray is optional: importing this module
never imports it.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, Sequence

from mergelab.errors import MergelabError

RAY_HINT = "pip install 'mergelab[ray]'"


class LocalExecutor:
    """Runs jobs sequentially in this process."""

    name = "local"

    def run(self, fn: Callable[[dict], dict], jobs: Sequence[dict]) -> Iterator[dict]:
        for job in jobs:
            yield fn(job)

    def close(self) -> None:
        pass


def _ray():
    try:
        import ray
    except ImportError as e:
        raise MergelabError(f"executor 'ray' needs Ray: {RAY_HINT} (or use executor: local)") from e
    return ray


class RayExecutor:
    """Runs jobs as Ray tasks, ``cpus_per_run`` CPUs each (and ``gpus_per_run`` GPUs, ``memory_per_run`` bytes).

    Without ``address`` a private local Ray runtime is started (no server to set up) with
    ``num_cpus`` CPUs and stopped by ``close()``; with an address (``ray://...`` or ``host:port``,
    or ``auto``) an existing cluster is joined and left running.
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, cpus_per_run: float = 1,
                 gpus_per_run: float = 0, memory_per_run: int | None = None):
        ray = _ray()
        self.ray = ray
        self.cpus_per_run = cpus_per_run
        self.resources = {"num_gpus": gpus_per_run, **({"memory": memory_per_run} if memory_per_run else {})}
        self.started = False
        if not ray.is_initialized():
            # address "local": always a private runtime, never a cluster left by `ray start`;
        # workers must import mergelab from wherever this process does
            import mergelab
            src = os.path.dirname(os.path.dirname(os.path.abspath(mergelab.__file__)))
            env = {"PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
                   "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                          configure_logging=True)
            try:
                if address:
                    ray.init(address=address, runtime_env={"env_vars": env}, **kwargs)
                else:
                    # Ray nices its workers (15) by default; here they do all the work, so keep them
                    # at the priority of the command that started them
                    env["RAY_worker_niceness"] = "0"
                    old = {k: os.environ.get(k) for k in env}
                    os.environ.update(env)          # inherited by the local workers
                    try:
                        ray.init(address="local", num_cpus=num_cpus or min(2, os.cpu_count() or 1), **kwargs)
                    finally:
                        for k, v in old.items():
                            if v is None:
                                os.environ.pop(k, None)
                            else:
                                os.environ[k] = v
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"the Ray cluster at {address}" if address else "a local Ray runtime"
                raise MergelabError(f"cannot start {where}: {str(e).splitlines()[0]}") from e
            self.started = True

    def run(self, fn: Callable[[dict], dict], jobs: Sequence[dict]) -> Iterator[dict]:
        ray = self.ray
        remote = ray.remote(num_cpus=self.cpus_per_run, max_retries=0, **self.resources)(fn)
        pending = {remote.remote(job): i for i, job in enumerate(jobs)}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    pending.pop(ref)
                    yield ray.get(ref)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False


def make_executor(kind: str, address: str | None = None, num_cpus: int | None = None, cpus_per_run: float = 1,
                  gpus_per_run: float = 0, memory_per_run: int | None = None):
    if kind == "local":
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(address, num_cpus, cpus_per_run, gpus_per_run, memory_per_run)
    raise MergelabError(f"executor must be 'local' or 'ray', got {kind!r}")
