"""Fast sensitivity curves for ``macs=`` allocation, and their on-disk cache.

The curve of a group is the model's output error with that group alone pruned at 25, 50 and
75 % (its consumers refit), as ``data.sensitivity_curves`` measures it by running the whole
pruned model for each trial. Here the work each trial shares is done once:

* **moments once**: with one group pruned, a consumer's input is the original input at the
  kept channels, so its refit needs only a sub-block of the full XᵀX, XᵀY of the original
  model, collected in one pass over the calibration batches for every consumer. Where one
  consumer of the group feeds another (a residual stream), the later one's input carries
  the earlier refit's error; such a group is refit on its pruned model, as the pass does,
  and so is a residual width, whose LayerNorms change the kept channels' values too;
* **activations reused**: a trial differs from the original only downstream of the group's
  producers, so only that part runs, fed the original activations at its frontier;
* **ratios in one batch**: the three pruned copies of that part form one model (tensors
  suffixed per ratio) and run in one onnxruntime session.

Outputs made by Softmax/LogSoftmax are compared on the Softmax input (the logits): a
probability saturates near 0 and 1 and hides how close a sequence head came to flipping a
class. A sequence head ([batch, time, classes], a CTC recognizer's) is measured at the CTC
level (``data.sequence_error``): the per-step KL divergence of its class distributions plus
the fraction of steps whose greedy class changed, not the logits' L2 distance. Curves are cached in ``$ONNXPRESS_CACHE_DIR`` (default ``~/.cache/onnxpress``; ``off``
turns it off), keyed by a hash of the model, the calibration batches and the settings, so a
rerun or a search reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper
from onnxpress.passes.prune_channels.data import SENSITIVITY_RATIOS, output_error
from onnxpress.passes.prune_channels.importance import keep_top
from onnxpress.passes.prune_channels.refit import (
    LinearLayer,
    RowsWithOnes,
    Targets,
    refit_consumers,
)
from onnxpress.passes.prune_channels.rewrite import Pruner

from onnxpress.analysis.channels.groups import ChannelGroup, ChannelGroups
from onnxpress.analysis.channels.layout import node_key
from onnxpress.analysis.channels.residual import renormalized
from onnxpress.analysis.refit import Tap, TensorCapture, collect_moments, refit_right
from onnxpress.calibration.activations import Moments
from onnxpress.core.calibration_data import Batch
from onnxpress.core.ir import to_graph, to_model
from onnxpress.core.verify import Runner

logger = logging.getLogger(__name__)

Curves = dict[int, tuple[list[float], list[float]]]
CACHE_VERSION = 2  # 2: sequence heads measured by data.sequence_error


def cache_key(model: onnx.ModelProto, batches: list[Batch], settings: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(model.SerializeToString(deterministic=True))
    for batch in batches:
        for name in sorted(batch):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(batch[name]).tobytes())
    digest.update(json.dumps({**settings, "version": CACHE_VERSION}, sort_keys=True).encode())
    return digest.hexdigest()


def cache_path(key: str) -> Path | None:
    root = os.environ.get("ONNXPRESS_CACHE_DIR", str(Path.home() / ".cache" / "onnxpress"))
    return None if root == "off" else Path(root) / "sensitivity" / f"{key}.json"


def load_curves(key: str) -> Curves | None:
    path = cache_path(key)
    if path is None or not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
        return {int(g): (list(r), list(e)) for g, (r, e) in stored.items()}
    except (OSError, ValueError, TypeError) as exc:
        logger.warning("ignoring the unreadable sensitivity cache %s: %s", path, exc)
        return None


def save_curves(key: str, curves: Curves) -> None:
    path = cache_path(key)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps({str(g): c for g, c in curves.items()}))
        temporary.replace(path)
    except OSError as exc:
        logger.warning("could not write the sensitivity cache %s: %s", path, exc)


def compared_outputs(model: onnx.ModelProto) -> list[str]:
    """Per graph output, the tensor compared: a Softmax/LogSoftmax output's input."""
    producers = {o: n for n in model.graph.node for o in n.output}
    names = []
    for output in model.graph.output:
        node = producers.get(output.name)
        softmax = node is not None and node.op_type in ("Softmax", "LogSoftmax")
        names.append(node.input[0] if softmax and node is not None else output.name)
    return names


def sequence_axes(model: onnx.ModelProto) -> list[int | None]:
    """Per graph output, the class axis where it is a sequence head: a Softmax/LogSoftmax
    over the last axis of a tensor of rank 3 or more ([batch, time, classes], CTC)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    axes: list[int | None] = []
    for output in model.graph.output:
        node = producers.get(output.name)
        rank = len(output.type.tensor_type.shape.dim) if output.type.HasField("tensor_type") else 0
        axis = -1
        if node is not None:
            axis = next((int(a.i) for a in node.attribute if a.name == "axis"), -1)
        sequence = node is not None and node.op_type in ("Softmax", "LogSoftmax") and rank >= 3
        axes.append(rank - 1 if sequence and axis in (-1, rank - 1) else None)
    return axes


def _full_moments(
    model: onnx.ModelProto, layers: Mapping[str, LinearLayer], batches: list[Batch]
) -> dict[str, Moments]:
    """[x, 1]ᵀ[x, 1] and [x, 1]ᵀy of every consumer on the original model, one pass."""
    taps = []
    for key, layer in layers.items():
        w0, _ = layer.matrix()
        taps.append(
            Tap(
                key=key,
                student=layer.node.inputs[0].name,
                rows=RowsWithOnes(layer),
                dim=w0.shape[0] + 1,
                teacher=layer.node.outputs[0].name,
                targets=Targets(layer, None, w0.shape[0]),
                target_dim=w0.shape[1],
            )
        )
    if not taps:
        return {}
    capture = TensorCapture(model, [t.student for t in taps] + [str(t.teacher) for t in taps])
    return collect_moments(capture, capture, taps, batches)


def _refit_from_moments(
    trial: Any, pruner: Pruner, keys: list[str], full: Mapping[str, Moments], damping: float
) -> None:
    """Refit the group's consumers in ``trial`` from sub-blocks of the original moments."""
    nodes = {node_key(n): n for n in trial.nodes}
    for key in keys:
        node, moments = nodes.get(key), full.get(key)
        layer = LinearLayer.of(node) if node is not None else None
        if layer is None or moments is None or moments.xty is None:
            continue
        w0, b0 = layer.matrix()
        per = layer.features_per_channel
        kept_in = pruner.indices(layer.node.inputs[0])
        features = moments.xtx.shape[0] - 1
        if kept_in is None:
            rows = np.arange(features)
        else:
            rows = (kept_in[:, None] * per + np.arange(per)[None, :]).reshape(-1)
        rows = np.append(rows, features)  # the bias row
        kept_out = pruner.indices(layer.node.outputs[0])
        columns = np.arange(moments.xty.shape[1]) if kept_out is None else kept_out
        initial = np.vstack([w0, b0[None, :]])
        if initial.shape != (len(rows), len(columns)):
            continue
        sub = Moments(len(rows), len(columns))
        sub.xtx = moments.xtx[np.ix_(rows, rows)]
        sub.xty = moments.xty[np.ix_(rows, columns)]
        solved = refit_right(np.eye(len(rows)), sub, initial, damping)

        def error(w: np.ndarray, block: Moments = sub) -> float:
            return float(np.sum(w * (block.xtx @ w)) - 2.0 * np.sum(w * block.xty))

        if error(solved) < error(initial):
            layer.write(trial, solved[:-1], solved[-1])


def _downstream(
    model: onnx.ModelProto, sources: set[str], known: set[str] | None = None
) -> list[onnx.NodeProto]:
    """Nodes of ``model`` (topological order) fed, transitively, by the ``sources`` nodes,
    and those making what they read that is not ``known`` (a tensor the pruning added)."""
    nodes = list(model.graph.node)
    dirty_tensors: set[str] = set()
    chosen: set[int] = set()
    for index, node in enumerate(nodes):
        if (node.output and node.output[0] in sources) or any(
            i in dirty_tensors for i in node.input
        ):
            chosen.add(index)
            dirty_tensors.update(node.output)
    if known is not None:
        producer = {o: i for i, n in enumerate(nodes) for o in n.output}
        stack = list(chosen)
        while stack:
            for name in nodes[stack.pop()].input:
                found = producer.get(name)
                if name not in known and found is not None and found not in chosen:
                    chosen.add(found)
                    stack.append(found)
    return [nodes[i] for i in sorted(chosen)]


def chained(model: onnx.ModelProto, consumers: set[str]) -> bool:
    """Whether one of the ``consumers`` (node keys) is downstream of another."""
    for key in consumers:
        reached = {n.output[0] for n in _downstream(model, {key}) if n.output}
        if (reached - {key}) & consumers:
            return True
    return False


def _merged(
    trials: list[onnx.ModelProto],
    sources: set[str],
    compared: list[str],
    types: Mapping[str, int],
    known: set[str] | None = None,
) -> tuple[onnx.ModelProto, list[str], list[list[str | None]]]:
    """One model holding each trial's downstream part, tensors suffixed by the trial index.

    Returns (model, frontier inputs, per trial the output names: None where the compared
    tensor is not downstream of the group, so the original's value holds).
    """
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    frontier: list[str] = []
    outputs: list[list[str | None]] = []
    for index, trial in enumerate(trials):
        part = _downstream(trial, sources, known)
        produced = {o for n in part for o in n.output}
        weights = {t.name: t for t in trial.graph.initializer}
        rename = {name: f"{name}~{index}" for name in produced}
        used_weights = {i for n in part for i in n.input if i in weights}
        rename.update({name: f"{name}~{index}" for name in used_weights})
        for node in part:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"{node.name}~{index}"
            copy.input[:] = [rename.get(i, i) for i in node.input]
            copy.output[:] = [rename.get(o, o) for o in node.output]
            nodes.append(copy)
            frontier.extend(i for i in node.input if i and i not in produced and i not in weights)
        for name in used_weights:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(weights[name])
            tensor.name = rename[name]
            inits.append(tensor)
        outputs.append([rename[name] if name in produced else None for name in compared])
    frontier = list(dict.fromkeys(frontier))
    every = [name for names in outputs for name in names if name is not None]
    graph = helper.make_graph(
        nodes,
        "sensitivity",
        [
            helper.make_tensor_value_info(n, types.get(n, onnx.TensorProto.FLOAT), None)
            for n in frontier
        ],
        [
            helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
            for n in dict.fromkeys(every)
        ],
        inits,
    )
    merged = helper.make_model(graph, opset_imports=list(trials[0].opset_import))
    merged.ir_version = trials[0].ir_version
    return merged, frontier, outputs


@dataclass(frozen=True)
class Probe:
    """One allocation unit's trials: each (ratio, kept channels per group) is pruned alone;
    the trial differs from the original downstream of ``producers`` (node keys), and the
    ``consumers`` are refit as the pass will."""

    index: int
    name: str
    producers: frozenset[str]
    consumers: frozenset[str]
    trials: tuple[tuple[float, Mapping[int, np.ndarray]], ...]
    norms: frozenset[str] = frozenset()  # LayerNorms over the channels (a residual width)


def fast_sensitivity_curves(
    groups: ChannelGroups,
    candidates: list[ChannelGroup],
    scores: Mapping[int, np.ndarray],
    model: onnx.ModelProto,
    batches: list[Batch],
    damping: float | None,
    norm_stats: str = "kept",
) -> Curves:
    """(ratios, output errors) per group, as ``data.sensitivity_curves`` defines them."""
    probes = []
    for group in candidates:
        counts = sorted(
            {max(1, round(group.size * (1 - r))) for r in SENSITIVITY_RATIOS} - {group.size},
            reverse=True,
        )
        trials = tuple(
            (1 - count / group.size, {group.index: keep_top(scores[group.index], count)})
            for count in counts
        )
        probes.append(
            Probe(
                group.index,
                group.name,
                frozenset(group.producers),
                frozenset(group.consumers),
                trials,
                frozenset(group.norms),
            )
        )
    return probe_curves(groups, probes, model, batches, damping, norm_stats)


def probe_curves(
    groups: ChannelGroups,
    probes: list[Probe],
    model: onnx.ModelProto,
    batches: list[Batch],
    damping: float | None,
    norm_stats: str = "kept",
) -> Curves:
    """(ratios, output errors) per probe: each trial pruned alone, refit, run from the
    original activations at its frontier."""
    compared, axes = compared_outputs(model), sequence_axes(model)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    base = to_graph(model)
    base_nodes = {node_key(n): n for n in base.nodes}
    layers = {}
    if damping is not None:
        for key in sorted({k for probe in probes for k in probe.consumers}):
            layer = LinearLayer.of(base_nodes[key]) if key in base_nodes else None
            if layer is not None and base_nodes[key].op != "GRU":
                layers[key] = layer
    full = _full_moments(model, layers, batches)
    capture = TensorCapture(model, compared + [t for n in model.graph.node for t in n.output])
    activations: list[dict[str, np.ndarray]] = [dict(batch) for batch in batches]
    known = {t for n in model.graph.node for t in n.output} | {i.name for i in model.graph.input}

    def original(index: int, names: list[str]) -> list[np.ndarray]:
        """Original tensors of batch ``index``, captured once and kept for later groups."""
        missing = [n for n in names if n not in activations[index]]
        if missing:
            activations[index].update(capture(batches[index], missing))
        return [activations[index][n] for n in names]

    reference = [original(i, compared) for i in range(len(batches))]
    curves: Curves = {}
    for probe in probes:
        if not probe.trials:
            curves[probe.index] = ([1.0], [0.0])
            continue
        trials = []
        for _, kept in probe.trials:
            trial = to_graph(model)
            pruner = Pruner(trial, groups, kept, norm_stats)
            pruner.apply()
            rescaled = renormalized(probe.norms, base_nodes)  # a width: LayerNorm stats change
            if damping is not None and (rescaled or chained(model, set(probe.consumers))):
                refit_consumers(
                    trial, groups, pruner, set(probe.consumers), [model], lambda: batches, damping
                )
            elif damping is not None:
                _refit_from_moments(trial, pruner, sorted(probe.consumers), full, damping)
            trials.append(to_model(trial, model))
        merged, frontier, names = _merged(trials, set(probe.producers), compared, types, known)
        runner = Runner(merged)
        outputs: list[list[list[np.ndarray]]] = [[] for _ in trials]
        for index in range(len(batches)):
            feeds = dict(zip(frontier, original(index, frontier), strict=True))
            values = dict(zip(runner.output_names, runner(feeds), strict=True))
            for trial_index, trial_names in enumerate(names):
                outputs[trial_index].append(
                    [
                        reference[index][k] if name is None else values[name]
                        for k, name in enumerate(trial_names)
                    ]
                )
        ratios = [ratio for ratio, _ in probe.trials]
        errors = [output_error(reference, trial, axes) for trial in outputs]
        curves[probe.index] = (ratios, errors)
        logger.debug("sensitivity of %s: %s", probe.name, list(zip(ratios, errors, strict=True)))
    return curves
