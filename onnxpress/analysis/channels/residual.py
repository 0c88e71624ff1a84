"""The residual width of a transformer as a channel group: LayerNormalization over the channels.

In a transformer the residual stream carries the embedding width from the embedding through
every block's residual Add to the final norm. Its channels are opened by the layers that
write into the stream (the embedding, each attention output projection, each feed-forward
down projection; the residual Adds identify them one to one) and read by the layers behind
each LayerNormalization (query / key / value, the feed-forward up projection, the head).

A LayerNormalization over the last axis, where the channels lie, is the one op in that chain
that mixes channels: y_c = γ_c (x_c − μ) / σ + β_c with μ, σ taken over every channel. It
is traced as a per-channel op (γ and β are sliced with the channels) whose statistics are
recomputed over the kept channels after pruning: pruning such a group is not exact even
where the removed channels carry nothing, so its consumers are refit by least squares to
the teacher's outputs (``passes/prune_channels``; ``renormalized`` says which groups).

A LayerNormalization that also normalizes axes other than the channel axis, or whose mean /
inverse-std outputs are read, or whose γ / β are computed, still refuses the channels,
naming what blocks them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.analysis.channels.layout import node_key
from onnxpress.analysis.channels.trace import Tracer, attr, constant_array, is_used

WIDTH_NORMS = frozenset({"LayerNormalization"})


def layer_norm(t: Tracer, node: gs.Node) -> None:
    """LayerNormalization: passes channels on when it normalizes other axes; over exactly
    the channel axis (the last), records itself as a norm of the group (γ, β sliced)."""
    layout, rank = t.layout(node.inputs[0]), t.rank(node.inputs[0])
    if layout is None:
        return
    if rank is None:
        t.refuse(layout, node, "unknown rank")
        return
    axis = int(attr(node, "axis", -1)) % rank
    if any(is_used(out, t) for out in node.outputs[1:]):
        t.refuse(layout, node, "mean / inverse std outputs are used")
        return
    if layout.axis < axis:  # normalizes axes after the channels: channel-wise
        t.set(node.outputs[0], layout)
        return
    if axis != rank - 1 or layout.axis != rank - 1:
        t.refuse(
            layout,
            node,
            f"normalizes over axes {axis}..{rank - 1}, not the channel axis {layout.axis} alone",
        )
        return
    length = t.length(layout)
    for tensor in node.inputs[1:3]:
        if not tensor.name:
            continue
        value = constant_array(tensor)
        if value is None:
            t.refuse(layout, node, f"scale / bias '{tensor.name}' is not a constant")
            return
        if value.size != 1 and value.shape[-1:] != (length,):
            t.refuse(layout, node, f"scale / bias '{tensor.name}' does not span the channels")
            return
    t.norms[node_key(node)] = node.inputs[0].name
    t.set(node.outputs[0], layout)


def renormalized(norms: Iterable[str], nodes: Mapping[str, gs.Node]) -> bool:
    """Whether one of a group's ``norms`` (node keys) takes statistics over its channels (a
    residual width): pruning then changes the kept channels' values too, so the group's
    consumers need a refit."""
    return any(key in nodes and nodes[key].op in WIDTH_NORMS for key in norms)


def slice_norm_parameters(values: np.ndarray, kept: np.ndarray) -> np.ndarray | None:
    """γ or β of a LayerNormalization over the channels, at the kept channels (None when it
    is a broadcast scalar and stays as it is)."""
    if values.size == 1:
        return None
    return np.take(values, kept, axis=-1)
