"""Terminal rendering for the CLI: aligned tables, human-readable numbers, a progress line.

Only the CLI uses this module; the library itself never writes to the terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from onnxpress.core.report import Report
from onnxpress.core.stats import ModelStats


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


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(widths[i]) if i in right else v.ljust(widths[i]) for i, v in enumerate(values)
        ]
        return "  ".join(parts).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(row) for row in cells)
    return "\n".join(out)


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
    rows = []
    for record in report.passes:
        v = record.verification
        if v.metric is None:
            verdict = v.level
        else:
            verdict = f"{v.metric} {v.value:.2g} <= {v.limit:.2g}"
        changes = _counts(record.result.counts)
        if record.result.refusals:
            changes += f" ({len(record.result.refusals)} refused)"
        rows.append(
            [
                record.spec,
                _duration(record.seconds),
                _change(record.before.nodes, record.after.nodes),
                _change(record.before.params, record.after.params),
                _change(record.before.macs, record.after.macs),
                _change(record.before.bytes, record.after.bytes, "B"),
                changes,
                verdict,
            ]
        )
    body = table(
        ["pass", "time", "nodes", "params", "MACs", "bytes", "changes", "verified"],
        rows,
        right=(1,),
    )
    total = _summary(report.before, report.after)
    refusals = []
    for record in report.passes:
        for refusal in record.result.refusals[:5]:
            refusals.append(f"  {record.name}: {refusal.node or '<graph>'}: {refusal.reason}")
        extra = len(record.result.refusals) - 5
        if extra > 0:
            refusals.append(f"  {record.name}: ... and {extra} more (see the JSON report)")
    text = body + "\n\n" + total
    if refusals:
        text += "\n\nrefused:\n" + "\n".join(refusals)
    return text


def _summary(before: ModelStats, after: ModelStats) -> str:
    def pct(a: int, b: int) -> str:
        return f" ({(b - a) / a * 100:+.1f}%)" if a else ""

    return (
        f"nodes {before.nodes} -> {after.nodes}{pct(before.nodes, after.nodes)}, "
        f"params {human(before.params)} -> {human(after.params)}{pct(before.params, after.params)}, "
        f"MACs {human(before.macs)} -> {human(after.macs)}{pct(before.macs, after.macs)}, "
        f"size {human(before.bytes, 'B')} -> {human(after.bytes, 'B')}{pct(before.bytes, after.bytes)}"
    )


class Progress:
    """A one-line progress display on a TTY, plain lines otherwise (quiet when disabled)."""

    def __init__(self, stream: TextIO = sys.stderr, enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = stream.isatty()
        self._started = 0.0

    def __call__(self, event: str, index: int, total: int, name: str) -> None:
        if not self.enabled:
            return
        if event == "start":
            self._started = time.perf_counter()
            bar = "#" * index + "." * (total - index)
            text = f"[{bar}] {index + 1}/{total} {name} ..."
            if self.tty:
                self.stream.write("\r\x1b[2K" + text)
                self.stream.flush()
        elif event == "done":
            elapsed = time.perf_counter() - self._started
            text = f"{index + 1}/{total} {name} done in {elapsed:.2f}s"
            if self.tty:
                self.stream.write("\r\x1b[2K" + (text + "\n" if index + 1 == total else text))
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def clear(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
