"""The rewrite of a LayerNormalization over a pruned residual width.

``norm-stats=kept`` (the default, as in width-pruning recipes such as Minitron): the
LayerNorm gets γ and β at the kept channels and normalizes over them; its mean and variance
are recomputed over the k kept channels of D. Consumers are then refit to the teacher.

``norm-stats=full``: the statistics keep the original width. The LayerNorm's input is padded
with D − k zeros on the channel axis (Pad), it normalizes the D-wide tensor with γ, β zero on
the padding, and a Slice returns the k kept channels to its consumers:

    μ = Σ_kept x / D,   σ² = Σ_kept x² / D − μ²

which is what the original computed when the removed channels carried zeros, so pruning such
channels is then exact; otherwise the removed channels count as zeros in the statistics. The
Pad and Slice cost O(D) per token; the projections behind the LayerNorm still read k rows.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.analysis.channels.residual import slice_norm_parameters
from onnxpress.analysis.channels.trace import constant_array
from onnxpress.core.ir import unique_name


def norm_parameters(
    node: gs.Node, kept: np.ndarray, width: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(input index, new value) for γ and β: the kept channels, then zeros up to ``width``."""
    for index in (1, 2):
        if index >= len(node.inputs) or not node.inputs[index].name:
            continue
        values = constant_array(node.inputs[index])
        sliced = None if values is None else slice_norm_parameters(values, kept)
        if sliced is not None:
            zeros = np.zeros((*sliced.shape[:-1], width - len(kept)), dtype=sliced.dtype)
            yield index, np.concatenate([sliced, zeros], axis=-1)


def pad_and_slice(
    graph: gs.Graph, node: gs.Node, kept: int, padding: int, rank: int, taken: set[str]
) -> None:
    """x -> Pad(zeros at the end of the last axis) -> node -> Slice(0:kept) -> consumers."""
    base = node.name or node.outputs[0].name
    pads = np.zeros(2 * rank, dtype=np.int64)
    pads[2 * rank - 1] = padding

    def name(suffix: str) -> str:
        return unique_name(graph, f"{base}_{suffix}", taken)

    padded = gs.Variable(name("padded"), dtype=node.inputs[0].dtype)
    pad = gs.Node(
        "Pad",
        name("pad"),
        inputs=[node.inputs[0], gs.Constant(name("pads"), pads)],
        outputs=[padded],
    )
    out = node.outputs[0]
    wide = gs.Variable(name("full_width"), dtype=out.dtype)
    cut = gs.Node(
        "Slice",
        name("slice"),
        inputs=[
            wide,
            gs.Constant(name("starts"), np.array([0], dtype=np.int64)),
            gs.Constant(name("ends"), np.array([kept], dtype=np.int64)),
            gs.Constant(name("axes"), np.array([rank - 1], dtype=np.int64)),
        ],
        outputs=[out],
    )
    node.inputs[0] = padded
    node.outputs[0] = wide
    position = next(i for i, n in enumerate(graph.nodes) if n is node)
    graph.nodes[position : position + 1] = [pad, node, cut]
