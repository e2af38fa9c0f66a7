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
