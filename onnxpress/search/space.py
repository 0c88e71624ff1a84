"""The search space: which lossy passes apply to this model, and the knobs of each.

A candidate is one pipeline, in a fixed order that makes sense for compression:

    <lossless prefix>, svd{budget}, prune-channels{macs,criterion,multiple}, qdq{...}, toposort

(svd first: its data-aware refit reads the original model's layer outputs by name, which a
pruned layer no longer matches in shape.)

- ``prune-channels``: the share of MACs kept, the channel criterion, the allocation and
  ``multiple=8`` (kept counts that onnxruntime's blocked kernels run fastest;
  docs/BENCHMARKS.md);
- ``svd``: the global budget (the pass spreads it over layers by their measured spectra);
- ``qdq``: the calibration method, HardSwish split on models that have one, GRU/LSTM weights
  int8 or float, and how many of the layers most sensitive to int8 stay float (from the
  cached per-layer sensitivities, ``sensitivity.py``);
- the lossless prefix always folds constants and BatchNorm and fuses unrolled GRU loops.

A pass applies when a probe of it on the model changes something (``probe_passes``).
Each value is an Optuna distribution; the parameters of a pass exist only when the pass
is on (conditional parameters), so every sampler sees the same space.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import onnx
import optuna

from onnxpress.core.manager import PassManager, VerifyConfig
from onnxpress.core.pipeline import parse_pipeline

logger = logging.getLogger(__name__)

LOSSLESS_PREFIX = "fold-constants,fold-batchnorm,fuse-gru,cleanup"
SUFFIX = "toposort"
QUANTIZABLE_OPS = {"Conv", "MatMul", "Gemm", "GRU", "LSTM", "RNN"}
RECURRENT_OPS = {"GRU", "LSTM", "RNN"}
QDQ_METHODS = ("auto", "minmax", "percentile", "mse")
MAX_FLOAT_LAYERS = 6
# the single-pass pipelines evaluated first: the reference points of the report's plots
REFERENCE_SETTINGS = {"prune-channels": 0.75, "svd": 0.75}


@dataclass(frozen=True)
class SearchSpace:
    """The passes that apply to one model and the ranges of their knobs."""

    prune: bool = False
    svd: bool = False
    qdq: bool = False
    convolutional: bool = False  # the model has Conv layers
    hardswish: bool = False  # qdq may split HardSwish
    recurrent: bool = False  # qdq may keep GRU/LSTM weights float
    int8_layers: tuple[str, ...] = ()  # quantizable layers, most int8-sensitive first
    refusals: dict[str, str] = field(default_factory=dict)  # pass -> why it is left out

    @property
    def passes(self) -> list[str]:
        names = [("prune-channels", self.prune), ("svd", self.svd), ("qdq", self.qdq)]
        return [name for name, on in names if on]

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """The trial's choices, sampled from the space (conditional per pass)."""
        params: dict[str, Any] = {}
        if self.prune and trial.suggest_categorical("prune", [False, True]):
            params["prune.macs"] = trial.suggest_float("prune.macs", 0.3, 0.95, step=0.05)
            params["prune.criterion"] = trial.suggest_categorical(
                "prune.criterion", ["l1", "reconstruction"]
            )
            params["prune.allocation"] = trial.suggest_categorical(
                "prune.allocation", ["uniform", "sensitivity"]
            )
            params["prune.multiple"] = trial.suggest_categorical("prune.multiple", [1, 8])
        if self.svd and trial.suggest_categorical("svd", [False, True]):
            params["svd.budget"] = trial.suggest_float("svd.budget", 0.3, 0.95, step=0.05)
        if self.qdq and trial.suggest_categorical("qdq", [False, True]):
            params["qdq.method"] = trial.suggest_categorical("qdq.method", list(QDQ_METHODS))
            if self.int8_layers:
                most = min(MAX_FLOAT_LAYERS, len(self.int8_layers) - 1)
                params["qdq.float_layers"] = trial.suggest_int("qdq.float_layers", 0, most)
            if self.hardswish:
                params["qdq.split_hardswish"] = trial.suggest_categorical(
                    "qdq.split_hardswish", [False, True]
                )
            if self.recurrent:
                params["qdq.recurrent"] = trial.suggest_categorical(
                    "qdq.recurrent", ["auto", "int8", "float"]
                )
        return params

    def pipeline(self, params: dict[str, Any]) -> str:
        """The pipeline text of a trial's choices (pasteable into ``optimize --passes``)."""
        steps = [LOSSLESS_PREFIX]
        if params.get("svd.budget") is not None:
            steps.append(f"svd{{budget={params['svd.budget']:g}}}")
        if params.get("prune.macs") is not None:
            options = [f"macs={params['prune.macs']:g}"]
            if params.get("prune.criterion", "l1") != "l1":
                options.append(f"criterion={params['prune.criterion']}")
            if params.get("prune.allocation", "sensitivity") != "sensitivity":
                options.append(f"allocation={params['prune.allocation']}")
            if params.get("prune.multiple", 1) != 1:
                options.append(f"multiple={params['prune.multiple']}")
            steps.append("prune-channels{" + ",".join(options) + "}")
        if params.get("qdq.method") is not None:
            options = []
            if params["qdq.method"] != "auto":
                options.append(f"method={params['qdq.method']}")
            floats = self.int8_layers[: int(params.get("qdq.float_layers", 0))]
            if floats:
                options.append("exclude=[" + ",".join(floats) + "]")
            if params.get("qdq.split_hardswish"):
                options.append("split-hardswish=true")
            if params.get("qdq.recurrent", "auto") != "auto":
                options.append(f"recurrent={params['qdq.recurrent']}")
            steps.append("qdq{" + ",".join(options) + "}" if options else "qdq")
        steps.append(SUFFIX)
        return ",".join(steps)

    def single(self, name: str, **settings: Any) -> dict[str, Any]:
        """The params of a trial that runs only pass ``name`` (``prune``, ``svd``, ``qdq``), at
        its defaults except ``settings`` (keys without the prefix: ``macs=0.8``); for
        ``study.enqueue_trial`` (the warm start)."""
        params: dict[str, Any] = {
            key: key == name
            for key, on in (("prune", self.prune), ("svd", self.svd), ("qdq", self.qdq))
            if on
        }
        if not params.get(name):
            raise ValueError(f"pass '{name}' is not in this model's search space")
        defaults: dict[str, Any] = {}
        if name == "qdq":
            defaults["method"] = "auto"
            if self.int8_layers:
                defaults["float_layers"] = 0
            if self.hardswish:
                defaults["split_hardswish"] = False
            if self.recurrent:
                defaults["recurrent"] = "auto"
        elif name == "svd":
            defaults["budget"] = REFERENCE_SETTINGS["svd"]
        else:
            defaults.update(
                macs=REFERENCE_SETTINGS["prune-channels"],
                criterion="l1",
                allocation="sensitivity",
                multiple=1,
            )
        unknown = set(settings) - set(defaults)
        if unknown:
            raise ValueError(f"pass '{name}' has no search knob {', '.join(sorted(unknown))}")
        params.update({f"{name}.{key}": value for key, value in {**defaults, **settings}.items()})
        return params

    def references(self) -> dict[str, dict[str, Any]]:
        """Each single-pass pipeline at its usual setting: label -> the trial's params."""
        found: dict[str, dict[str, Any]] = {}
        if self.qdq:
            found["qdq"] = self.single("qdq")
        if self.svd:
            found[f"svd{{budget={REFERENCE_SETTINGS['svd']:g}}}"] = self.single("svd")
        if self.prune:
            macs = REFERENCE_SETTINGS["prune-channels"]
            found[f"prune-channels{{macs={macs:g}}}"] = self.single("prune")
        return found

    def to_json(self) -> dict[str, Any]:
        return {
            "passes": self.passes,
            "convolutional": self.convolutional,
            "hardswish": self.hardswish,
            "recurrent": self.recurrent,
            "int8_layers": list(self.int8_layers),
            "refused": dict(self.refusals),
        }


def probe_passes(model: onnx.ModelProto) -> tuple[dict[str, bool], dict[str, str]]:
    """Whether prune-channels and svd change this model at a middle setting (no data, no
    verification: only whether they find something to rewrite), and why not."""
    applies: dict[str, bool] = {}
    reasons: dict[str, str] = {}
    probes = {"prune-channels": "prune-channels{ratio=0.5}", "svd": "svd{params=0.5}"}
    for name, text in probes.items():
        try:
            _, report = PassManager(
                parse_pipeline(f"{LOSSLESS_PREFIX},{text}"), VerifyConfig(level="off")
            ).run(model)
        except Exception as exc:  # a pass that cannot run on this model is left out
            applies[name] = False
            reasons[name] = f"{type(exc).__name__}: {exc}"
            continue
        result = report.passes[-1].result
        applies[name] = result.changed
        if not result.changed:
            why = "; ".join(f"{r.node}: {r.reason}" for r in result.refusals[:2])
            reasons[name] = why or "nothing to rewrite"
    return applies, reasons


def build_space(model: onnx.ModelProto, int8_layers: tuple[str, ...]) -> SearchSpace:
    ops = {node.op_type for node in model.graph.node}
    applies, reasons = probe_passes(model)
    quantizable = bool(ops & QUANTIZABLE_OPS)
    if not quantizable:
        reasons["qdq"] = "no Conv, MatMul, Gemm or recurrent op"
    return SearchSpace(
        prune=applies["prune-channels"],
        svd=applies["svd"],
        qdq=quantizable,
        convolutional="Conv" in ops,
        hardswish="HardSwish" in ops,
        recurrent=bool(ops & RECURRENT_OPS),
        int8_layers=int8_layers,
        refusals=reasons,
    )
