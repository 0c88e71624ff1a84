"""The search report: plots (PNG, matplotlib) and one self-contained ``report.html``.

Built from ``search.json`` alone (``onnxpress.search.front.search_json``):

- accuracy against latency and against size, every completed trial, the Pareto front
  joined, the baseline and each single-pass pipeline marked;
- the front, and with ``--distill`` whether each point's model was distilled (and kept);
- per Pareto point, what each pass chose per layer (kept channels, ranks, layers left float);
- a table of all trials: pipeline, values, where the latency was measured, failures and why.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from onnxpress.search.finish import describe

_TRIAL: dict[str, Any] = {"s": 14, "c": "#9aa5b1", "label": "trial"}
_FRONT: dict[str, Any] = {"s": 30, "c": "#d1495b", "label": "Pareto front (all objectives)"}
PLOTS = {"latency": "accuracy_latency.png", "size": "accuracy_size.png"}
AXIS_LABELS = {
    "latency": "latency vs baseline (ratio, lower is faster)",
    "size": "size on disk vs baseline (ratio)",
}


def _x_value(trial: dict[str, Any], axis: str, baseline_bytes: int) -> float | None:
    values = trial.get("values") or {}
    if axis in values:
        return float(values[axis])
    measured = trial.get("measured") or {}
    if axis == "latency" and measured.get("latency"):
        return float(measured["latency"]["ratio"])
    if axis == "size" and measured.get("bytes"):
        return float(measured["bytes"]) / float(max(baseline_bytes, 1))
    return None


def plot(data: dict[str, Any], axis: str) -> bytes:
    """One PNG: accuracy against ``axis`` (latency or size) for every completed trial."""
    complete = [t for t in data["trials"] if t["state"] == "complete"]
    front = {f["trial"] for f in data["front"]}
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    size = data["baseline"]["bytes"]
    points: list[tuple[float, float, dict[str, Any]]] = []
    for trial in complete:
        x = _x_value(trial, axis, size)
        if x is not None:
            points.append((x, float(trial["values"]["accuracy"]), trial))
    for in_front, style in ((False, _TRIAL), (True, _FRONT)):
        chosen = [(x, y) for x, y, t in points if (t["number"] in front) == in_front]
        if chosen:
            ax.scatter([x for x, _ in chosen], [y for _, y in chosen], **style)
    ax.scatter(
        [1.0], [data["baseline"]["accuracy"]], marker="*", s=160, c="black", label="baseline"
    )
    by_number = {t["number"]: (x, y) for x, y, t in points}
    for label, number in data.get("references", {}).items():
        if number in by_number:
            x, y = by_number[number]
            ax.scatter([x], [y], marker="s", s=50, facecolors="none", edgecolors="#00798c")
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlabel(AXIS_LABELS[axis])
    ax.set_ylabel(f"accuracy ({data['metric']})")
    name = str(data["model"]).replace("\\", "/").rsplit("/", 1)[-1]
    ax.set_title(f"{name}: {len(complete)} completed trials", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("" if value is None else str(value))


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _choices(trial: dict[str, Any]) -> str:
    parts = []
    for step in trial.get("choices", []):
        layers = "; ".join(
            f"{c.get('layer') or c.get('node') or c.get('weight')}: "
            + (f"{c['kept']}/{c['of']} channels" if "kept" in c else f"rank {c.get('rank')}")
            for c in step.get("layers", [])
        )
        floats = ", ".join(step.get("float_layers", []))
        text = f"<b>{html.escape(step['pass'])}</b>"
        if layers:
            text += f": {html.escape(layers)}"
        if floats:
            text += f"; float: {html.escape(floats)}"
        parts.append(text)
    return "<br>".join(parts) or "lossless passes only"


def render_html(data: dict[str, Any], pngs: dict[str, bytes]) -> str:
    objectives = list(data["objectives"])
    images = "".join(
        f'<img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode()}">'
        for name, png in pngs.items()
    )
    by_number = {t["number"]: t for t in data["trials"]}
    front_rows = [
        [
            f["trial"],
            *[f["values"][o] for o in objectives],
            (by_number[f["trial"]].get("measured") or {}).get("macs"),
            f["model"],
            *([describe(f.get("distilled"))] if data.get("distill") else []),
            f["pipeline"],
        ]
        for f in data["front"]
    ]
    front_headers = ["trial", *objectives, "MACs", "model"]
    front_headers += ["distilled", "pipeline"] if data.get("distill") else ["pipeline"]
    choice_rows = "".join(
        f"<tr><td>{f['trial']}</td><td>{_choices(by_number[f['trial']])}</td></tr>"
        for f in data["front"]
    )
    trial_rows = [
        [
            t["number"],
            t["state"] + (" (interrupted)" if t["interrupted"] else ""),
            "" if t["state"] != "complete" else ("yes" if t.get("feasible", True) else "no"),
            *[(t["values"] or {}).get(o) for o in objectives],
            t["latency_measured_on"],
            t["seconds"],
            t["pipeline"],
            t["failure"],
        ]
        for t in data["trials"]
    ]
    baseline = data["baseline"]
    failed = sum(1 for t in data["trials"] if t["state"] == "fail" and not t["interrupted"])
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>onnxpress search: {html.escape(data["model"])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}
table{{border-collapse:collapse;font-size:12px;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}}
img{{max-width:48%;margin-right:1%}}</style></head><body>
<h1>onnxpress search: {html.escape(data["model"])}</h1>
<p>Targets {html.escape(", ".join(data["targets"]))}; latency measured on
{html.escape(data["latency_measured_on"])}; accuracy: {html.escape(data["metric"])} on
{html.escape(str(data["eval"] or data["calibration"]))}; sampler {html.escape(data["sampler"])},
seed {data["seed"]}; {len(data["trials"])} trials, {failed} failed.
Baseline: accuracy {baseline["accuracy"]:.4g}, {baseline["bytes"]:,} bytes, {baseline["macs"]:,} MACs.</p>
{images}
<h2>Pareto front</h2>
{_table(front_headers, front_rows)}
<h2>Per-layer choices of each Pareto point</h2>
<table><tr><th>trial</th><th>choices</th></tr>{choice_rows}</table>
<h2>All trials</h2>
{_table(["trial", "state", "within --max-drop", *objectives, "latency measured on", "seconds", "pipeline", "failure"], trial_rows)}
</body></html>
"""


def report_files(data: dict[str, Any]) -> dict[str, bytes]:
    """The PNG plots and report.html, by file name."""
    complete = [t for t in data["trials"] if t["state"] == "complete"]
    size = data["baseline"]["bytes"]
    axes = [a for a in PLOTS if any(_x_value(t, a, size) is not None for t in complete)]
    pngs = {PLOTS[axis]: plot(data, axis) for axis in axes}
    return {**pngs, "report.html": render_html(data, pngs).encode("utf-8")}
