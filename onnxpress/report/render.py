"""Terminal rendering for the CLI with rich: the pass table, plain tables, the totals line.

Each function returns the text to print. On a terminal it carries rich's styles and fits the
terminal's width; when stdout is not a terminal (a pipe, a file, a test's capture) it is plain
text: no ANSI codes, ASCII rules, and tables at their natural width so no cell is cut. Only
the CLI uses this module; the library itself never writes to the terminal.
"""

from __future__ import annotations

import io
import shutil
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from rich import box
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from onnxpress.core.report import Report
from onnxpress.core.stats import ModelStats

# SIMPLE_HEAD drawn with ASCII: a dashed rule under the header, nothing else.
PLAIN_BOX = box.Box("    \n    \n -- \n    \n    \n    \n    \n    \n", ascii=True)
PLAIN_WIDTH = 1000  # wide enough that rich never wraps or cuts a cell in plain output


def is_terminal(stream: TextIO | None = None) -> bool:
    target = sys.stdout if stream is None else stream
    return bool(getattr(target, "isatty", lambda: False)())


def to_text(*renderables: RenderableType, stream: TextIO | None = None) -> str:
    """Render for ``stream`` (default stdout): styled on a terminal, plain text otherwise."""
    tty = is_terminal(stream)
    console = Console(
        file=io.StringIO(),
        force_terminal=tty,
        no_color=not tty,
        width=shutil.get_terminal_size().columns if tty else PLAIN_WIDTH,
        highlight=False,
        emoji=False,
    )
    for renderable in renderables:
        console.print(renderable)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    if not tty:
        text = "\n".join(line.rstrip() for line in text.splitlines())
    return str(text).rstrip("\n")


def new_table(headers: Sequence[str], right: Sequence[int] = (), plain: bool = False) -> Table:
    table = Table(
        box=PLAIN_BOX if plain else box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        header_style="" if plain else "bold",
    )
    for i, header in enumerate(headers):
        table.add_column(header, justify="right" if i in right else "left", no_wrap=plain)
    return table


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A table of ``rows`` under ``headers``; columns listed in ``right`` are right-aligned."""
    grid = new_table(headers, right, plain=not is_terminal())
    for row in rows:
        grid.add_row(*(Text(str(c)) for c in row))
    return to_text(grid)


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M'; bytes use binary units when unit == 'B'."""
    if unit == "B":
        value = float(n)
        for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(value) < 1024 or suffix == "TiB":
                return f"{value:.0f} {suffix}" if suffix == "B" else f"{value:.2f} {suffix}"
            value /= 1024
    value = float(n)
    for suffix in ("", "K", "M", "G", "T"):
        if abs(value) < 1000 or suffix == "T":
            return f"{value:.0f}{suffix}" if suffix == "" else f"{value:.2f}{suffix}"
        value /= 1000
    return str(n)


def _duration(seconds: float) -> str:
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 10:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.1f} s"


def _change(before: float, after: float, unit: str = "") -> str:
    if before == after:
        return human(after, unit)
    return f"{human(before, unit)} -> {human(after, unit)}"


def _counts(counts: dict[str, int]) -> str:
    shown = [f"{k}={v}" for k, v in counts.items() if v]
    return ", ".join(shown) if shown else "no change"


def render_report(report: Report) -> str:
    """What each pass did (one row per pass), the totals, and the first refusals."""
    headers = ["pass", "time", "nodes", "params", "MACs", "bytes", "changes", "verified"]
    grid = new_table(headers, right=(1,), plain=not is_terminal())
    for record in report.passes:
        v = record.verification
        verdict = v.level if v.metric is None else f"{v.metric} {v.value:.2g} <= {v.limit:.2g}"
        changes = _counts(record.result.counts)
        if record.result.refusals:
            changes += f" ({len(record.result.refusals)} refused)"
        cells = [
            record.spec,
            _duration(record.seconds),
            _change(record.before.nodes, record.after.nodes),
            _change(record.before.params, record.after.params),
            _change(record.before.macs, record.after.macs),
            _change(record.before.bytes, record.after.bytes, "B"),
            changes,
            verdict,
        ]
        grid.add_row(*(Text(c) for c in cells))
    parts: list[RenderableType] = [grid, Text(""), Text(_summary(report.before, report.after))]
    judged = _targets(report)
    if judged:
        parts += [Text(""), Text(judged)]
    refusals = []
    for record in report.passes:
        for refusal in record.result.refusals[:5]:
            refusals.append(f"  {record.name}: {refusal.node or '<graph>'}: {refusal.reason}")
        extra = len(record.result.refusals) - 5
        if extra > 0:
            refusals.append(f"  {record.name}: ... and {extra} more (see the JSON report)")
    if refusals:
        parts += [Text(""), Text("refused:", style="bold"), Text("\n".join(refusals))]
    return to_text(*parts)


def _targets(report: Report) -> str:
    """Each lossy pass's verdict per target (their int8 arithmetic emulated)."""
    lines = []
    for record in report.passes:
        targets = record.verification.targets
        if targets:
            cells = ", ".join(
                f"{name} {t['metric']} {t['value']:.2g}" for name, t in targets.items()
            )
            lines.append(f"  {record.name}: {cells}")
            host = record.verification.host_not_judged
            if host:
                lines.append(
                    f"  {record.name}: this CPU ({host['target']}) is not a target: its "
                    f"onnxruntime run ({host['metric']} {host['value']:.2g}) not judged"
                )
    if not lines:
        return ""
    return f"verified for {', '.join(report.targets)} (emulated int8 arithmetic):\n" + "\n".join(
        lines
    )


def _summary(before: ModelStats, after: ModelStats) -> str:
    def pct(a: int, b: int) -> str:
        return f" ({(b - a) / a * 100:+.1f}%)" if a else ""

    return (
        f"nodes {before.nodes} -> {after.nodes}{pct(before.nodes, after.nodes)}, "
        f"params {human(before.params)} -> {human(after.params)}{pct(before.params, after.params)}, "
        f"MACs {human(before.macs)} -> {human(after.macs)}{pct(before.macs, after.macs)}, "
        f"size {human(before.bytes, 'B')} -> {human(after.bytes, 'B')}{pct(before.bytes, after.bytes)}"
    )
