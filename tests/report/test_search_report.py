"""The search report: plots and one self-contained HTML file from search.json."""

from __future__ import annotations

import struct
from typing import Any

from onnxpress.report.search_report import report_files


def _trial(number: int, accuracy: float, size: float, latency: float | None) -> dict[str, Any]:
    values = {"accuracy": accuracy, "size": size}
    if latency is not None:
        values["latency"] = latency
    return {
        "number": number,
        "state": "complete",
        "params": {},
        "pipeline": f"p{number}",
        "values": values,
        "measured": {"bytes": int(size * 1000), "macs": 10},
        "choices": [
            {
                "pass": "prune-channels{macs=0.5}",
                "counts": {},
                "layers": [{"layer": "conv<1>", "kept": 8, "of": 16}],
                "float_layers": [],
            }
        ],
        "latency_measured_on": "onnxruntime here",
        "failure": None,
        "interrupted": False,
        "feasible": True,
        "seconds": 1.0,
    }


def _data(with_latency: bool) -> dict[str, Any]:
    trials = [
        _trial(0, 0.98, 0.4, 0.9 if with_latency else None),
        _trial(1, 0.97, 0.3, 0.7 if with_latency else None),
    ]
    failed = {
        **_trial(2, 0, 0, None),
        "state": "fail",
        "values": None,
        "failure": "pass 'svd' failed: <bad>",
    }
    objectives = ["accuracy", "size", *(["latency"] if with_latency else [])]
    return {
        "model": "m.onnx",
        "calibration": "c.npz",
        "eval": None,
        "metric": "agreement",
        "targets": ["host"],
        "latency_measured_on": "onnxruntime here",
        "objectives": {o: "x" for o in objectives},
        "sampler": "tpe",
        "seed": 0,
        "baseline": {"accuracy": 0.98, "bytes": 1000, "macs": 20},
        "references": {"qdq": 0},
        "front": [
            {
                "trial": t["number"],
                "values": t["values"],
                "pipeline": t["pipeline"],
                "model": f"pareto/trial-{t['number']}.onnx",
            }
            for t in trials
        ],
        "trials": [*trials, failed],
    }


def test_report_embeds_plots_and_escapes_text() -> None:
    files = report_files(_data(with_latency=True))
    assert set(files) == {"accuracy_latency.png", "accuracy_size.png", "report.html"}
    for name in ("accuracy_latency.png", "accuracy_size.png"):
        png = files[name]
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", png[16:24])
        assert width > 300 and height > 200
    page = files["report.html"].decode()
    assert page.count("data:image/png;base64,") == 2
    assert "pass &#x27;svd&#x27; failed: &lt;bad&gt;" in page  # failures listed, escaped
    assert "conv&lt;1&gt;: 8/16 channels" in page  # per-layer choices of front points


def test_without_latency_only_the_size_plot() -> None:
    files = report_files(_data(with_latency=False))
    assert set(files) == {"accuracy_size.png", "report.html"}


def test_progress_plain_and_live() -> None:
    import io

    import optuna

    from onnxpress.report.search_progress import SearchProgress
    from onnxpress.search.engine import SearchState

    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    trial.set_user_attr("pipeline", "fold-constants,cleanup,qdq{exclude=[a]}")
    study.tell(trial, [0.98, 0.4])
    failed = study.ask()
    failed.set_user_attr("failure", "pass 'svd' failed: [boom]")
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    state = SearchState(2, 5, None, study.best_trials, ("accuracy", "size"))

    plain = io.StringIO()
    progress = SearchProgress(plain)
    for frozen in study.get_trials():
        progress(frozen, state)
    lines = plain.getvalue().splitlines()
    assert lines == [
        "trial 0: accuracy 0.98, size 0.4 [2/5]",
        "trial 1: failed: pass 'svd' failed: [boom] [2/5]",
    ]

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    live = SearchProgress(screen)
    for frozen in study.get_trials():
        live(frozen, state)
    live.clear()
    assert (
        "Pareto front (1 points)" in screen.getvalue() and "qdq{exclude=[a]}" in screen.getvalue()
    )
