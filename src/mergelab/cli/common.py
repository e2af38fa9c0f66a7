"""What every command shares: progress bars on a terminal only."""

from __future__ import annotations


class TqdmProgress:
    """Progress callback ``(stage, done, total)`` drawing one tqdm bar per stage on stderr.

    Bars are shown on a terminal only (``quiet`` hides them everywhere) and closed before any error
    message, so that the error stands on its own line.
    """

    def __init__(self, quiet: bool = False, unit: str = "tensor"):
        self.disable = True if quiet else None      # None: tqdm shows bars only on a TTY
        self.unit = unit
        self.bars: dict[str, object] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm.auto import tqdm
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit=self.unit, disable=self.disable,
                                          dynamic_ncols=True)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


# ---------------------------------------------------------------- option values (argparse types: one-line errors)

def _int_at_least(text: str, low: int, what: str) -> int:
    import argparse
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def finite_float(text: str) -> float:
    import argparse
    import math
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def positive_float(text: str) -> float:
    import argparse
    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


def check_device(device: str | None, flag: str = "--device") -> str | None:
    """``cpu``, ``cuda``, ``cuda:N`` (present on this machine) or ``mps``; else one line."""
    import re

    from mergelab.errors import MergelabError
    if device is None:
        return None
    d = str(device).strip().lower()
    m = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", d)
    if not m or (m.group(1) == "cpu" and m.group(2) not in (None, "0")):
        raise MergelabError(f"{flag} {device!r}: unknown device (use cpu, cuda or cuda:N)")
    if m.group(1) == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise MergelabError(f"{flag} {device!r}: CUDA is not available on this machine (use cpu)")
        if m.group(2) is not None and int(m.group(2)) >= torch.cuda.device_count():
            raise MergelabError(f"{flag} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if m.group(1) == "mps":
        import torch
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise MergelabError(f"{flag} {device!r}: MPS is not available on this machine (use cpu)")
    return d


def tqdm_bar(quiet: bool, **kw):
    """A tqdm bar on stderr, drawn only on a terminal (``quiet``: never): no ``\\r`` bars in piped logs."""
    import sys

    from tqdm.auto import tqdm
    return tqdm(disable=True if quiet else None, file=sys.stderr, dynamic_ncols=True, **kw)
