"""report.render and report.progress: plain text without ANSI codes when the output is not a
terminal, every cell whole however wide the table, and styled output on a terminal."""

from __future__ import annotations

import io

from onnxpress.core.pass_base import PassResult
from onnxpress.core.report import PassRecord, Report, VerifyOutcome
from onnxpress.core.stats import ModelStats
from onnxpress.report.progress import EpochBar, PassProgress
from onnxpress.report.render import human, render_report, table, to_text


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _stats(nodes: int, params: int) -> ModelStats:
    return ModelStats(
        nodes=nodes,
        params=params,
        macs=params,
        bytes=4 * params,
        op_histogram={"MatMul": nodes},
        macs_by_op={"MatMul": params},
    )


def _report() -> Report:
    result = PassResult()
    result.count("factored", 2)
    result.refuse("/layers/Gemm", "too small " * 30)
    record = PassRecord(
        "svd",
        "svd{energy=0.9}",
        False,
        0.25,
        _stats(5, 17226),
        _stats(7, 8910),
        result,
        VerifyOutcome("numeric", "rel-l2", 0.06, 0.2),
    )
    return Report("svd{energy=0.9}", _stats(5, 17226), _stats(7, 8910), [record])


def test_plain_report_has_no_ansi_and_whole_cells() -> None:
    text = render_report(_report())  # pytest's captured stdout is not a terminal
    assert "\x1b[" not in text
    header, rule, row = text.splitlines()[:3]
    assert header.split() == [
        "pass",
        "time",
        "nodes",
        "params",
        "MACs",
        "bytes",
        "changes",
        "verified",
    ]
    assert set(rule) == {"-"}
    assert "svd{energy=0.9}" in row and "factored=2 (1 refused)" in row
    assert "rel-l2 0.06 <= 0.2" in row and "5 -> 7" in row
    assert "nodes 5 -> 7 (+40.0%)" in text and "refused:" in text


def test_plain_table_right_alignment() -> None:
    lines = table(["op", "count"], [["MatMul", 3], ["Add", 12]], right=(1,)).splitlines()
    assert lines[2].endswith(" 3") and lines[3].endswith("12")
    assert human(1234567) == "1.23M" and human(2048, "B") == "2.00 KiB"


def test_terminal_output_is_styled() -> None:
    assert "\x1b[" in to_text(_report_table_for_tty(), stream=_Tty())


def _report_table_for_tty() -> object:
    from onnxpress.report.render import new_table

    grid = new_table(["pass"], plain=False)
    grid.add_row("svd")
    return grid


def test_progress_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    progress = PassProgress(stream)
    progress("start", 0, 2, "cleanup")
    progress("done", 0, 2, "cleanup")
    epochs = EpochBar(stream)
    epochs(1, 2, 0.5, 0.25)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("1/2 cleanup done in ")
    assert lines[1].startswith("[#.] ") and lines[1].endswith(
        "epoch 1/2 loss 0.5000 held-out 0.2500"
    )
    assert "\x1b[" not in stream.getvalue()


def test_progress_quiet_when_disabled() -> None:
    stream = io.StringIO()
    PassProgress(stream, enabled=False)("done", 0, 1, "cleanup")
    assert stream.getvalue() == ""
