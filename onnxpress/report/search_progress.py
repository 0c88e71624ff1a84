"""The live display of ``onnxpress search``: trials done, time left and the current front.

On a terminal it is a rich table on stderr, redrawn in place after every trial; otherwise one
plain line per trial (no ANSI codes). The search calls it through ``search(on_trial=...)``.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from optuna.trial import FrozenTrial, TrialState
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from onnxpress.search.engine import SearchState
from onnxpress.search.study import FAILURE

FRONT_ROWS = 8


def _format_values(values: list[float] | None, objectives: tuple[str, ...]) -> str:
    if not values:
        return "-"
    return ", ".join(f"{name} {value:.4g}" for name, value in zip(objectives, values, strict=True))


class SearchProgress:
    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        stream = stream if stream is not None else sys.stderr  # as it is now, not at import
        tty = bool(getattr(stream, "isatty", lambda: False)())
        self.console = Console(file=stream, force_terminal=tty, no_color=not tty, highlight=False)
        self.stream = stream
        self.enabled = enabled
        self.live = enabled and tty
        self._live: Live | None = None

    def __call__(self, trial: FrozenTrial, state: SearchState) -> None:
        if not self.enabled:
            return
        left = ""
        if state.deadline is not None:
            left = f", {max(0.0, state.deadline - time.perf_counter()):.0f} s left"
        if trial.state == TrialState.COMPLETE and not trial.user_attrs.get(FAILURE):
            outcome = _format_values(trial.values, state.objectives)
        else:
            outcome = f"failed: {trial.user_attrs.get(FAILURE, trial.state.name.lower())}"
        line = f"trial {trial.number}: {outcome} [{state.done}/{state.total}{left}]"
        if not self.live:
            print(line, file=self.stream, flush=True)
            return
        table = Table(title=f"Pareto front ({len(state.front)} points)", title_justify="left")
        table.add_column("trial", justify="right")
        for name in state.objectives:
            table.add_column(name, justify="right")
        table.add_column("pipeline")
        for best in state.front[:FRONT_ROWS]:
            table.add_row(
                str(best.number),
                *[f"{v:.4g}" for v in best.values],
                escape(str(best.user_attrs.get("pipeline", "")).split("cleanup,")[-1]),
            )
        view = Group(Text(line), table)
        if self._live is None:
            self._live = Live(view, console=self.console, transient=True, auto_refresh=False)
            self._live.start()
        self._live.update(view, refresh=True)

    def clear(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
