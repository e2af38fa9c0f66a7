"""Planning helpers of a streaming merge that need no torch: row blocks, the worker pool, thread counts
(shared by the torch engine and the torch-free task-arithmetic lane)."""

from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Callable, Sequence

Progress = Callable[[str, int, int], None]   # (stage, done, total)


# Tensors larger than this many elements are merged in blocks of rows, so that memory depends on
# neither the tensor's nor the model's size (16 MB per fp32 input block). Smaller tensors are taken
# whole: their thresholds need no extra streaming passes. On a GPU, blocks are larger (kernel launches
# and transfers of small blocks would dominate).
BLOCK_ELEMENTS = 1 << 22
CUDA_BLOCK_ELEMENTS = 1 << 24


def numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def row_blocks(shape: Sequence[int], block_elements: int = BLOCK_ELEMENTS) -> list[tuple[int, int]] | None:
    """Blocks of whole rows (first dimension) of at most ~``block_elements``; None: take it whole.

    Only tensors of 2+ dimensions are split: a row-wise method's "row" is the last dimension, which
    a split along the first dimension keeps intact.
    """
    if len(shape) < 2 or numel(shape) <= block_elements or shape[0] <= 1:
        return None
    per = max(1, block_elements // max(1, numel(shape[1:])))
    return [(a, min(a + per, shape[0])) for a in range(0, shape[0], per)]


def run_pool(names: Sequence[str], work: Callable[[str], object], threads: int,
             on_done: Callable[[str, object], None], stage: str, progress: Progress | None) -> None:
    """Run ``work`` over names on a thread pool with a bounded number in flight (bounded memory)."""
    total = len(names)
    if progress:
        progress(stage, 0, total)
    if threads <= 1:
        for i, name in enumerate(names):
            on_done(name, work(name))
            if progress:
                progress(stage, i + 1, total)
        return
    done = 0
    pending: dict[Future, str] = {}
    queue = list(names)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mergelab") as pool:
        try:
            while queue or pending:
                while queue and len(pending) < threads:
                    name = queue.pop(0)
                    pending[pool.submit(work, name)] = name
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    name = pending.pop(fut)
                    on_done(name, fut.result())
                    done += 1
                    if progress:
                        progress(stage, done, total)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


def default_threads() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
