"""Progress displays for the CLI's long loops, as callbacks the library calls.

The library reports progress through callbacks it is given and never prints:

- ``PassProgress``: ``PassManager(on_progress=...)``, one call when each pass starts and ends
  (the calibration of ``qdq`` and the refits run inside their pass);
- ``TuningBar``: ``compile_model(on_tuning_progress=...)``, MetaSchedule's measured trials;
- ``EpochBar``: ``distill(on_progress=...)``, one call per epoch.

On a terminal each is a rich progress bar on stderr, redrawn in place. Otherwise each writes
plain lines (no ANSI codes): one per pass, one per 10% of the trials, one per epoch.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from onnxpress.backends.tvm.tune import TuningProgress


def ascii_bar(done: int, total: int, width: int = 30) -> str:
    """The plain-text bar of a line written when stderr is not a terminal: ``###.....``."""
    filled = width * done // max(total, 1)
    return "#" * filled + "." * (width - filled)


class _Bar:
    """One rich progress bar on a terminal; plain lines through ``line`` otherwise."""

    def __init__(self, stream: TextIO = sys.stderr, enabled: bool = True) -> None:
        # The default is stderr as it was at import, as before rich: a test that captures
        # sys.stderr later sees only the error lines.
        tty = bool(getattr(stream, "isatty", lambda: False)())
        self.console = Console(file=stream, force_terminal=tty, no_color=not tty, highlight=False)
        self.enabled = enabled
        self.live = enabled and tty
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def show(self, description: str, completed: int, total: int) -> None:
        if not self.live:
            return
        if self._progress is None:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(description, total=total)
        assert self._task is not None
        self._progress.update(self._task, description=description, completed=completed, total=total)

    def line(self, text: str) -> None:
        if self.enabled and not self.live:
            self.console.print(text.rstrip(), markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class PassProgress(_Bar):
    """The pass manager's ``on_progress(event, index, total, name)``: a bar over the passes."""

    def __init__(self, stream: TextIO = sys.stderr, enabled: bool = True) -> None:
        super().__init__(stream, enabled)
        self._started = 0.0

    def __call__(self, event: str, index: int, total: int, name: str) -> None:
        if not self.enabled:
            return
        if event == "start":
            self._started = time.perf_counter()
            self.show(f"{name} ...", index, total)
        elif event == "done":
            elapsed = time.perf_counter() - self._started
            self.show(f"{name} done", index + 1, total)
            self.line(f"{index + 1}/{total} {name} done in {elapsed:.2f}s")
            if index + 1 == total:
                self.close()

    def clear(self) -> None:
        self.close()


class TuningBar(_Bar):
    """``on_tuning_progress``: trials measured out of the budget, and the kernel being tuned."""

    def __init__(self, stream: TextIO = sys.stderr, enabled: bool = True) -> None:
        super().__init__(stream, enabled)
        self.started = time.perf_counter()
        self.shown_tenths = -1

    def __call__(self, progress: TuningProgress) -> None:
        if not self.enabled:
            return
        done, total = progress.trials_done, max(1, progress.trials_total)
        kernel = f"kernel {progress.kernels_done + 1}: {progress.task}" if progress.task else ""
        self.show(f"tuning {kernel}".rstrip(), done, total)
        if 10 * done // total > self.shown_tenths:
            self.shown_tenths = 10 * done // total
            elapsed = time.perf_counter() - self.started
            self.line(
                f"tuning [{ascii_bar(done, total)}] {done}/{total} trials {elapsed:.0f}s  {kernel}"
            )


class EpochBar(_Bar):
    """``distill(on_progress=...)``: epoch, epochs, training loss, held-out loss."""

    def __call__(self, epoch: int, epochs: int, train_loss: float, holdout_loss: float) -> None:
        if not self.enabled:
            return
        text = f"epoch {epoch}/{epochs} loss {train_loss:.4f} held-out {holdout_loss:.4f}"
        self.show(text, epoch, epochs)
        self.line(f"[{ascii_bar(epoch, epochs, epochs)}] {text}")
        if epoch == epochs:
            self.close()
