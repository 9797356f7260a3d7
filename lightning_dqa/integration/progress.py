"""A calibration progress bar in whichever progress bar the Trainer shows: TQDM, Rich, or none.

Calibration and the greedy ranking can take minutes before the first evaluation batch; Lightning's own bar
shows nothing of it. :class:`CalibrationProgress` adds a bar of the same kind: a task inside the live
``RichProgressBar`` display (or a Rich display of its own when none is live), a ``Tqdm`` bar for the
``TQDMProgressBar``, nothing when the progress bar is disabled or on ranks other than 0.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar

__all__ = ["CalibrationProgress"]


class CalibrationProgress:
    """One calibration phase shown as a bar; ``update(n)`` advances it, ``close()`` removes it.

    Args:
        trainer: the running Trainer (its ``progress_bar_callback`` decides the kind of bar).
        total: the phase's total (samples or candidates).
        description: the bar's label.
        unit: what ``total`` counts.

    """

    def __init__(self, trainer: pl.Trainer, total: int, description: str, unit: str = "sample") -> None:
        self.total = total
        self._tqdm: Any = None
        self._rich: Any = None
        self._own_rich = False
        self._task: Any = None
        bar = trainer.progress_bar_callback
        if bar is None or not trainer.is_global_zero or not getattr(bar, "is_enabled", True):
            return
        if isinstance(bar, RichProgressBar):
            self._start_rich(bar, description)
        else:
            from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

            self._tqdm = Tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, leave=True)

    def _start_rich(self, bar: RichProgressBar, description: str) -> None:
        from rich.progress import Progress

        live = bar.progress
        if live is not None and live.live.is_started:
            self._rich = live
        else:
            self._rich, self._own_rich = Progress(transient=True), True
            self._rich.start()
        self._task = self._rich.add_task(description, total=self.total)

    @property
    def kind(self) -> str:
        """``"tqdm"``, ``"rich"`` or ``"none"``: which bar is shown."""
        return "tqdm" if self._tqdm is not None else "rich" if self._rich is not None else "none"

    def update(self, n: int) -> None:
        """Advance by ``n``."""
        if self._tqdm is not None:
            self._tqdm.update(n)
        elif self._rich is not None:
            self._rich.update(self._task, advance=n)

    def set_total(self, done: int, total: int) -> None:
        """Show ``done`` of ``total`` (for phases that report absolute progress, e.g. the greedy search)."""
        if self._tqdm is not None:
            self._tqdm.total = total
            self._tqdm.n = done
            self._tqdm.refresh()
        elif self._rich is not None:
            self._rich.update(self._task, completed=done, total=total)

    def close(self) -> None:
        """Remove the bar (a Rich task leaves the user's live display as it was)."""
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._rich is not None:
            self._rich.remove_task(self._task)
            if self._own_rich:
                self._rich.stop()
        self._tqdm = self._rich = None
