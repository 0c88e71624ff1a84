"""Structured pruning of whole attention heads in multi-head attention.

For each attention block (``match``: the torch legacy export, MatMul + Add + Reshape
[.., H, Dh] + Transpose for q, k and v, Softmax(q·kᵀ / s)·v, Transpose + Reshape [.., H·Dh]
and the output projection), the heads kept K ⊂ {0..H−1}:

    Wq, Wk, Wv [D, H·Dh] -> [D, |K|·Dh] (their biases likewise), Wo [H·Dh, D'] -> [|K|·Dh, D']
    Reshape [.., H, Dh] -> [.., |K|, Dh],  Reshape [.., H·Dh] -> [.., |K|·Dh]

Importance (gradient-free, with calibration data): the relative squared change of the
model's outputs when that head alone is masked (its value columns zeroed, which is exactly
what removing it does before any refit), on ``batches`` calibration batches, in one
onnxruntime session whose value weights are inputs (``analysis.probes``). Without data:
‖Wv columns of h‖·‖Wo rows of h‖. ``keep`` is the fraction of all heads kept, the least
important removed first across blocks, at least ``min-heads`` per block.

Head dimensions: ``qk-dims`` keeps that fraction of every kept head's query/key dimensions
(the same count in each head, Wq and Wk columns together: the scores q·kᵀ sum over them;
the softmax scale stays), ``vo-dims`` of its value dimensions (Wv columns and Wo rows
together), chosen by ‖Wq col‖·‖Wk col‖ and ‖Wv col‖·‖Wo row‖; the head Reshapes follow.

``refit`` (default with calibration): the output projection is refit by least squares on
the kept heads' centred context, Wo' = argmin ‖X̄_K·Wo' − X̄·Wo‖² + λ‖Wo' − Wo_K‖², and its
bias Add takes the difference of the means, E[x]·Wo − E[x_K]·Wo' (X is the model's context before
the pass, XᵀX from ``collect_moments``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnxpress.passes.prune_heads.match import AttentionBlock, find_blocks

from onnxpress.analysis.probes import relative_change, weights_as_inputs
from onnxpress.analysis.refit import Tap, collect_moments
from onnxpress.calibration.activations import Moments
from onnxpress.core.context import PassContext, TensorShapes
from onnxpress.core.ir import own_constant, unique_name
from onnxpress.core.pass_base import Pass, PassResult
from onnxpress.core.registry import register_pass
from onnxpress.core.verify import Runner

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneHeadsOptions:
    keep: float = 0.5  # fraction of all heads kept
    qk_dims: float = 1.0  # fraction of each kept head's query/key dimensions kept
    vo_dims: float = 1.0  # fraction of each kept head's value dimensions (Wo rows) kept
    min_heads: int = 1  # per block
    batches: int = 4  # calibration batches that measure importance
    refit: bool | None = None  # least-squares output projection; default: with calibration
    damping: float = 0.01  # relative ridge of the refit

    def __post_init__(self) -> None:
        for name in ("keep", "qk_dims", "vo_dims"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name.replace('_', '-')} must be in (0, 1], not {value}")
        if self.min_heads < 1 or self.batches < 1:
            raise ValueError("min-heads and batches must be >= 1")
        if not self.damping > 0:
            raise ValueError(f"damping must be > 0, not {self.damping}")


@register_pass("prune-heads")
class PruneHeads(Pass[PruneHeadsOptions]):
    """Remove the least important attention heads (q/k/v columns, output rows, head Reshapes)."""

    options_type = PruneHeadsOptions
    lossless = False
    metric = "rel-l2"
    default_budget = 0.5  # as prune-channels: structured pruning moves the logits
    recovery_hint = "try prune-heads{keep=0.9}, or distill the result (onnxpress distill)"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        opts, result = self.options, PassResult()
        refit = opts.refit if opts.refit is not None else ctx.calibration is not None
        if refit and ctx.calibration is None:
            raise ValueError("refit=true needs calibration data")
        softmax = any(n.op == "Softmax" for n in graph.nodes)
        shapes = TensorShapes.compute(graph, ctx) if softmax else None
        blocks, refused = find_blocks(graph, shapes)
        for name, reason in refused:
            result.refuse(name, reason)
        if not blocks:
            return result
        importance = self._importance(graph, ctx, blocks)
        kept = self._choose(blocks, importance)
        moments: dict[str, Moments] = {}
        if refit and ctx.calibration is not None:
            taps = [
                Tap(b.name, str(b.out.inputs[0].name), lambda a: a, b.heads * b.head_dim)
                for b in blocks
            ]
            moments = collect_moments(ctx.export(graph), None, taps, ctx.calibration.batches())
        for block in blocks:
            heads = kept[block.name]
            result.details.append(
                {
                    "block": block.name,
                    "heads": block.heads,
                    "kept": heads,
                    "importance": [float(v) for v in importance[block.name]],
                    "head_dim": block.head_dim,
                    "qk_dims_kept": max(1, round(opts.qk_dims * block.head_dim)),
                    "vo_dims_kept": max(1, round(opts.vo_dims * block.head_dim)),
                }
            )
            if len(heads) == block.heads and opts.qk_dims == opts.vo_dims == 1.0:
                continue
            self._rewrite(graph, block, heads, moments.get(block.name))
            result.count("heads_pruned", block.heads - len(heads))
            result.count("blocks_pruned")
        graph.cleanup()  # the head Reshapes' old shape constants
        return result

    def _importance(
        self, graph: gs.Graph, ctx: PassContext, blocks: list[AttentionBlock]
    ) -> dict[str, np.ndarray]:
        if ctx.calibration is None:
            return {b.name: _magnitude(b) for b in blocks}
        names = {str(b.value.weight.name) for b in blocks}
        names |= {str(b.value.bias.name) for b in blocks if b.value.bias is not None}
        runner = Runner(weights_as_inputs(ctx.export(graph), names))
        arrays = {str(b.value.weight.name): np.asarray(b.value.weight.values) for b in blocks}
        for b in blocks:
            if b.value.bias is not None:
                arrays[str(b.value.bias.name)] = np.asarray(b.value.bias.values)
        batches = list(ctx.calibration.batches(self.options.batches))
        references = [runner({**batch, **arrays}) for batch in batches]
        scores: dict[str, np.ndarray] = {}
        for b in blocks:
            values = np.zeros(b.heads)
            for head in range(b.heads):
                masked = dict(arrays)
                columns = slice(head * b.head_dim, (head + 1) * b.head_dim)
                weight = arrays[str(b.value.weight.name)].copy()
                weight[:, columns] = 0
                masked[str(b.value.weight.name)] = weight
                if b.value.bias is not None:
                    bias = arrays[str(b.value.bias.name)].copy()
                    bias[columns] = 0
                    masked[str(b.value.bias.name)] = bias
                values[head] = sum(
                    relative_change(ref, runner({**batch, **masked}))
                    for batch, ref in zip(batches, references, strict=True)
                )
            scores[b.name] = values / max(len(batches), 1)
        return scores

    def _choose(
        self, blocks: list[AttentionBlock], importance: dict[str, np.ndarray]
    ) -> dict[str, list[int]]:
        total = sum(b.heads for b in blocks)
        to_remove = total - max(round(self.options.keep * total), 1)
        kept = {b.name: list(range(b.heads)) for b in blocks}
        ranked = sorted(
            (float(importance[b.name][h]), b.name, h) for b in blocks for h in range(b.heads)
        )
        floor = {b.name: min(self.options.min_heads, b.heads) for b in blocks}
        for _, name, head in ranked:
            if to_remove <= 0:
                break
            if len(kept[name]) > floor[name]:
                kept[name].remove(head)
                to_remove -= 1
        return kept

    def _rewrite(
        self, graph: gs.Graph, block: AttentionBlock, heads: list[int], moments: Moments | None
    ) -> None:
        qk, vo = _kept_dims(block, heads, self.options.qk_dims, self.options.vo_dims)
        for projection, columns in ((block.query, qk), (block.key, qk), (block.value, vo)):
            weight = np.asarray(projection.weight.values)
            projection.weight.values = np.ascontiguousarray(weight[:, columns])
            if projection.bias is not None:  # shared with other nodes: this block's own copy
                add = projection.output.inputs[0]
                index = next(i for i, t in enumerate(add.inputs) if t is projection.bias)
                projection.bias = own_constant(graph, add, index)
                projection.bias.values = np.asarray(projection.bias.values)[columns].copy()
        out_weight = block.out.inputs[1]
        assert isinstance(out_weight, gs.Constant)
        dense = np.asarray(out_weight.values)
        rows = dense[vo].astype(np.float64)
        if moments is not None:
            rows = _refit_rows(dense.astype(np.float64), vo, moments, self.options.damping)
            _shift_bias(graph, block.out, dense, rows, vo, moments)
        out_weight.values = rows.astype(dense.dtype)
        for reshape, columns in zip(block.split_shapes, (qk, qk, vo), strict=True):
            _set_shape(graph, reshape, -2, len(heads))
            _set_shape(graph, reshape, -1, len(columns) // len(heads))
        _forget_shapes(block)
        _set_shape(graph, block.merge_shape, -1, len(vo), keep_minus_one=True)


def _kept_dims(
    block: AttentionBlock, heads: list[int], qk_dims: float, vo_dims: float
) -> tuple[np.ndarray, np.ndarray]:
    """Columns kept of Wq/Wk and of Wv (rows of Wo): the same count in every kept head, the
    dimensions whose products ‖Wq col‖·‖Wk col‖ (‖Wv col‖·‖Wo row‖) are largest."""
    dim = block.head_dim
    w = {
        name: np.linalg.norm(np.asarray(p.weight.values, np.float64), axis=0)
        for name, p in (("q", block.query), ("k", block.key), ("v", block.value))
    }
    out = np.linalg.norm(np.asarray(block.out.inputs[1].values, np.float64), axis=1)
    picks = []
    for score, fraction in ((w["q"] * w["k"], qk_dims), (w["v"] * out, vo_dims)):
        count = max(1, round(fraction * dim))
        columns = []
        for h in heads:
            own = score[h * dim : (h + 1) * dim]
            columns.append(h * dim + np.sort(np.argsort(-own, kind="stable")[:count]))
        picks.append(np.concatenate(columns))
    return picks[0], picks[1]


def _forget_shapes(block: AttentionBlock) -> None:
    """Drop the inferred shapes between the projections and the output projection."""
    stack = [p.matmul for p in (block.query, block.key, block.value)]
    seen: set[int] = set()
    while stack:
        current = stack.pop()
        if id(current) in seen or current is block.out:
            continue
        seen.add(id(current))
        for tensor in current.outputs:
            tensor.shape = None
            stack.extend(tensor.outputs)


def _magnitude(block: AttentionBlock) -> np.ndarray:
    value = np.asarray(block.value.weight.values, np.float64)
    out = np.asarray(block.out.inputs[1].values, np.float64)
    dim = block.head_dim
    return np.array(
        [
            np.linalg.norm(value[:, h * dim : (h + 1) * dim])
            * np.linalg.norm(out[h * dim : (h + 1) * dim])
            for h in range(block.heads)
        ]
    )


def _refit_rows(
    dense: np.ndarray, columns: np.ndarray, moments: Moments, damping: float
) -> np.ndarray:
    """argmin ‖X̄_K·W' − X̄·W‖² + λ‖W' − W_K‖² on centred rows X̄ (the bias takes the means),
    from the moments alone: the targets are X·W."""
    mean = moments.sum / max(moments.count, 1)
    gram = moments.xtx / max(moments.count, 1) - np.outer(mean, mean)
    kept = gram[np.ix_(columns, columns)]
    scale = float(np.trace(kept)) / max(len(columns), 1)
    ridge = damping * (scale if scale > 0 else 1.0)
    rhs = gram[columns] @ dense + ridge * dense[columns]
    return np.asarray(np.linalg.solve(kept + ridge * np.eye(len(columns)), rhs))


def _shift_bias(
    graph: gs.Graph,
    out: gs.Node,
    dense: np.ndarray,
    rows: np.ndarray,
    columns: np.ndarray,
    moments: Moments,
) -> None:
    """Add E[x]·W − E[x_K]·W' to the output projection's bias Add, where it has one."""
    result = out.outputs[0]
    add = result.outputs[0] if len(result.outputs) == 1 else None
    if add is None or add.op != "Add":
        return
    index = next((i for i, t in enumerate(add.inputs) if isinstance(t, gs.Constant)), None)
    if index is None or np.ndim(add.inputs[index].values) != 1:
        return
    bias = own_constant(graph, add, index)
    mean = moments.sum / max(moments.count, 1)
    shift = mean @ dense - mean[columns] @ rows
    bias.values = (np.asarray(bias.values, np.float64) + shift).astype(bias.values.dtype)


def _set_shape(
    graph: gs.Graph, reshape: gs.Node, axis: int, size: int, keep_minus_one: bool = False
) -> None:
    shape = reshape.inputs[1]
    if isinstance(shape, gs.Constant):
        values = np.asarray(shape.values).copy()
    else:
        values = np.asarray(shape.inputs[0].attrs["value"].values).copy()
    if keep_minus_one and values[axis] == -1:
        return
    values[axis] = size
    name = unique_name(graph, f"{reshape.name}_pruned_shape")
    reshape.inputs[1] = gs.Constant(name, values.astype(np.int64))


__all__ = ["PruneHeads", "PruneHeadsOptions"]
