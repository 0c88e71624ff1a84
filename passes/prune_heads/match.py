"""Find multi-head attention blocks in the torch legacy export form, for ``prune-heads``.

    q = Reshape(x·Wq + bq, [.., H, Dh]) -> Transpose [0,2,1,3]   (H may be -1)
    k = Reshape(x·Wk + bk, [.., H, Dh]) -> Transpose [0,2,3,1]   (k already transposed)
    v = Reshape(x·Wv + bv, [.., H, Dh]) -> Transpose [0,2,1,3]
    p = Softmax((q·k) [/ or * a constant] [+ a mask])
    o = Reshape(Transpose(p·v, [0,2,1,3]), [.., H·Dh]) · Wo (+ bo)

The mask (an attention mask, a causal mask; added before or after the scale) must be the
same for every head: of rank < 3 or 1 along the head axis, by its inferred shape. A bias
the projections share with other nodes (exporters share equal biases) is fine; the pass
gives each block its own copy before writing it (``own_constant``).

``find_blocks`` returns each block with its projections (weight, optional bias) and the two
Reshape shape inputs, or the reason a Softmax is not such a block. Head h owns the columns
h·Dh .. (h+1)·Dh of Wq, Wk, Wv (and their biases) and the same rows of Wo; removing it is
exact when its context is zero (its value columns zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.core.context import TensorShapes


@dataclass
class Projection:
    """x·W (+ b): the MatMul, its weight [in, out] and the bias constant of the Add, if any."""

    matmul: gs.Node
    weight: gs.Constant
    bias: gs.Constant | None
    output: gs.Tensor  # the Add's output when biased, else the MatMul's


@dataclass
class AttentionBlock:
    name: str  # the Softmax node's name
    heads: int
    head_dim: int
    query: Projection
    key: Projection
    value: Projection
    out: gs.Node  # the output projection MatMul, reading the merged context
    split_shapes: list[gs.Node]  # the three Reshape nodes [.., H, Dh]
    merge_shape: gs.Node  # the Reshape [.., H·Dh]


def _only_reader(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.outputs[0] if len(tensor.outputs) == 1 else None


def _producer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    if not tensor.inputs or tensor.inputs[0].op != op or len(tensor.outputs) != 1:
        return None
    node: gs.Node = tensor.inputs[0]
    return node


def _is_constant(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant) or bool(
        tensor.inputs and tensor.inputs[0].op == "Constant"
    )


def _shape_values(node: gs.Node) -> np.ndarray | None:
    shape = node.inputs[1]
    if isinstance(shape, gs.Constant):
        return np.asarray(shape.values).reshape(-1)
    if shape.inputs and shape.inputs[0].op == "Constant":
        return np.asarray(shape.inputs[0].attrs["value"].values).reshape(-1)
    return None


def _projection(tensor: gs.Tensor) -> Projection | str:
    """The constant projection that produces ``tensor`` (x·W + b or x·W)."""
    bias: gs.Constant | None = None
    add = _producer(tensor, "Add")
    matmul_out = tensor
    if add is not None:
        left, right = add.inputs
        constant, other = (left, right) if isinstance(left, gs.Constant) else (right, left)
        if not isinstance(constant, gs.Constant) or np.ndim(constant.values) != 1:
            return f"'{add.name}' is not a bias Add of a constant vector"
        bias, matmul_out = constant, other
    matmul = _producer(matmul_out, "MatMul")
    if matmul is None or not isinstance(matmul.inputs[1], gs.Constant):
        return f"'{tensor.name}' is not produced by a MatMul with a constant weight"
    weight = matmul.inputs[1]
    if np.ndim(weight.values) != 2:
        return f"weight '{weight.name}' is not 2-D"
    return Projection(matmul, weight, bias, tensor)


def _split(tensor: gs.Tensor, perm: list[int]) -> tuple[gs.Node, Projection, int, int] | str:
    """Transpose(Reshape(projection, [.., H, Dh]), perm) -> (Reshape, projection, H, Dh)."""
    transpose = _producer(tensor, "Transpose")
    if transpose is None or list(transpose.attrs.get("perm", [])) != perm:
        return f"'{tensor.name}' is not a Transpose {perm} of the head split"
    reshape = _producer(transpose.inputs[0], "Reshape")
    shape = _shape_values(reshape) if reshape is not None else None
    if reshape is None or shape is None or len(shape) != 4 or shape[3] < 1 or shape[2] in (0, -2):
        return f"'{transpose.name}' does not read a Reshape to a constant [.., H, Dh]"
    projection = _projection(reshape.inputs[0])
    if isinstance(projection, str):
        return projection
    head_dim = int(shape[3])
    columns = int(np.shape(projection.weight.values)[1])
    heads = int(shape[2]) if shape[2] > 0 else columns // head_dim  # -1: inferred by Reshape
    if shape[2] < 0 and columns % head_dim:
        return f"weight '{projection.weight.name}' does not split into heads of {head_dim}"
    return reshape, projection, heads, head_dim


def _mask_shape(tensor: gs.Tensor, shapes: TensorShapes | None) -> list[int | None] | None:
    if isinstance(tensor, gs.Constant):
        return list(np.shape(tensor.values))
    if tensor.shape is not None and all(isinstance(d, int) for d in tensor.shape[-3:]):
        return list(tensor.shape)
    return shapes.get(str(tensor.name)) if shapes is not None else None


def _scores(softmax: gs.Node, shapes: TensorShapes | None) -> gs.Tensor | str:
    """q·k under Softmax's input, past a constant scale and a per-head-equal mask Add."""
    scores = softmax.inputs[0]
    for _ in range(3):
        step = scores.inputs[0] if scores.inputs and len(scores.outputs) == 1 else None
        if step is None or step.op == "MatMul":
            break
        if step.op in ("Div", "Mul") and _is_constant(step.inputs[1]):
            scores = step.inputs[0]
        elif step.op == "Add" and len(step.inputs) == 2:
            left, right = step.inputs
            side = [t for t in (left, right) if _reads_product(t)]
            if len(side) != 1:
                break
            scores = side[0]
            mask = right if scores is left else left
            shape = _mask_shape(mask, shapes)
            if shape is None or (len(shape) >= 3 and shape[-3] != 1):
                return f"the mask '{mask.name}' added to the scores is not known to be equal for every head"
        else:
            break
    return scores


def _reads_product(tensor: gs.Tensor) -> bool:
    """``tensor`` is a MatMul's output, or its output under a constant scale."""
    step = tensor.inputs[0] if tensor.inputs else None
    if step is not None and step.op in ("Div", "Mul") and _is_constant(step.inputs[1]):
        step = step.inputs[0].inputs[0] if step.inputs[0].inputs else None
    return step is not None and step.op == "MatMul"


def match_block(softmax: gs.Node, shapes: TensorShapes | None = None) -> AttentionBlock | str:
    """The attention block around ``softmax``, or why it is not one this pass prunes."""
    scores = _scores(softmax, shapes)
    if isinstance(scores, str):
        return scores
    product = _producer(scores, "MatMul")
    context = _only_reader(softmax.outputs[0])
    if product is None or context is None or context.op != "MatMul":
        return "not Softmax(q·kᵀ) read by one MatMul with the values"
    parts = [
        _split(product.inputs[0], [0, 2, 1, 3]),
        _split(product.inputs[1], [0, 2, 3, 1]),
        _split(context.inputs[1], [0, 2, 1, 3]),
    ]
    for part in parts:
        if isinstance(part, str):
            return part
    splits = [p for p in parts if not isinstance(p, str)]
    dims = {(p[2], p[3]) for p in splits}
    if len(dims) != 1:
        return f"query, key and value split into different (heads, head_dim): {sorted(dims)}"
    heads, head_dim = dims.pop()
    back = _only_reader(context.outputs[0])
    if back is None or back.op != "Transpose" or list(back.attrs.get("perm", [])) != [0, 2, 1, 3]:
        return "the context is not transposed back with [0,2,1,3]"
    merge = _only_reader(back.outputs[0])
    shape = _shape_values(merge) if merge is not None and merge.op == "Reshape" else None
    if merge is None or shape is None or shape[-1] not in (-1, heads * head_dim):
        return "the heads are not merged by a Reshape to a constant [.., H·Dh]"
    out = _only_reader(merge.outputs[0])
    if out is None or out.op != "MatMul" or not isinstance(out.inputs[1], gs.Constant):
        return "the merged context is not read by one MatMul with a constant weight"
    projections = [p[1] for p in splits]
    for projection in projections:
        if projection.weight.values.shape[1] != heads * head_dim:
            return f"weight '{projection.weight.name}' does not have H·Dh columns"
        if len(projection.weight.outputs) != 1:
            return f"weight '{projection.weight.name}' is shared with another node"
    if len(out.inputs[1].outputs) != 1:
        return f"output weight '{out.inputs[1].name}' is shared with another node"
    query, key, value = projections
    return AttentionBlock(
        name=str(softmax.name),
        heads=heads,
        head_dim=head_dim,
        query=query,
        key=key,
        value=value,
        out=out,
        split_shapes=[p[0] for p in splits],
        merge_shape=merge,
    )


def find_blocks(
    graph: gs.Graph, shapes: TensorShapes | None = None
) -> tuple[list[AttentionBlock], list[tuple[str, str]]]:
    """Every attention block, and (Softmax name, reason) for each Softmax that is not one.
    ``shapes`` (inferred) tell whether a mask is equal for every head."""
    blocks, refused = [], []
    for node in graph.nodes:
        if node.op != "Softmax":
            continue
        found = match_block(node, shapes)
        if isinstance(found, str):
            refused.append((str(node.name), found))
        else:
            blocks.append(found)
    return blocks, refused
