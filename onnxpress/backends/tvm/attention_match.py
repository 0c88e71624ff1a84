"""Static sizes of an attention (``Attention``) and the Relax pattern that the fused kernel
(attention_schedule.py) replaces (``match_attention``):

    matmul(softmax(matmul(q, kt) [* or / a constant] [+ broadcast masks], axis=-1), v)

(masks added one after the other, as T5's position bias and padding mask, are summed into
one before the kernel: the same sum but for rounding where both are finite and nonzero; a
cast of the probabilities to their own dtype in between, as GPT-2 has, is no step)

over static float32 [batch, heads, tokens, depth] tensors. Where q and v are the usual
split of a [batch, tokens, heads * depth] projection into heads (reshape, then
permute_dims(0, 2, 1, 3)), possibly of a slice of a wider one (the merged projections of
sibling_matmul.py), the kernel reads that tensor itself, token by token (``q_view`` /
``v_view``), and writes its output token-major: two head-split copies and the head merge
after the kernel are gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from onnxpress.backends.tvm.matmul_legalize import static_shape

COLUMNS = 16  # output columns of a register tile
SCORES_OPS = ("relax.matmul", "relax.multiply", "relax.divide", "relax.add")
MAX_MASKS = 4  # masks added to the scores, summed into one before the kernel


@dataclass(frozen=True)
class Attention:
    """Static sizes: batch, heads, queries M, keys N, head depth D, value depth E; the mask's
    shape (broadcast to [batch, heads, M, N]) or None. ``q_view`` / ``v_view``: (columns C,
    offset) where q (v) is read in token-major order from a [batch, M (N), C] tensor, head h
    at columns offset + h * D (E) (the projections' output, before its split into heads),
    else None ([batch, heads, M, D] as usual); with both, the output is token-major too,
    [batch, M, heads, E]."""

    batch: int
    heads: int
    queries: int
    keys: int
    depth: int
    value_depth: int
    scale: float
    mask: tuple[int, ...] | None
    q_view: tuple[int, int] | None = None
    v_view: tuple[int, int] | None = None

    @property
    def token_major(self) -> bool:
        """Whether q and v are read, and the output written, token by token."""
        return self.q_view is not None and self.v_view is not None

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        """The output's shape: [B, M, H, E] when token-major, else [B, H, M, E]."""
        if self.token_major:
            return (self.batch, self.queries, self.heads, self.value_depth)
        return (self.batch, self.heads, self.queries, self.value_depth)

    @property
    def padded_keys(self) -> int:
        """Keys rounded up to the score tile: kt, v and a mask with a keys axis arrive
        padded to it (``pad_operands``)."""
        return -(-self.keys // COLUMNS) * COLUMNS

    def fits(self) -> bool:
        """Whether the kernel applies: value vectors of whole register tiles. Rows and keys
        of any count run in padded tiles (see attention_kernel)."""
        return self.value_depth % COLUMNS == 0 and self.keys >= 1 and self.queries >= 1


def op_name(expr: Any) -> str:
    return str(getattr(getattr(expr, "op", None), "name", ""))


def _scalar(expr: Any) -> float | None:
    """The value of a one-element float constant, else None."""
    import tvm

    if not isinstance(expr, tvm.ir.Constant):
        return None
    values = expr.value.numpy()
    return float(values.reshape(-1)[0]) if values.size == 1 else None


def match_attention(call: Any, lookup: Any) -> tuple[Attention, list[Any]] | None:
    """(sizes, [q, kt, v, masks...]) where ``call`` is matmul(softmax(matmul(q, kt) [* or / a
    constant] [+ masks], axis=-1), v) over static float32 4-D tensors; else None. ``lookup``
    maps a variable to the expression bound to it (None where it has none)."""
    if op_name(call) != "relax.matmul":
        return None
    probs, v = call.args
    softmax = _past_identity_casts(lookup(probs), lookup)
    if op_name(softmax) != "relax.nn.softmax" or int(softmax.attrs.axis) not in (-1, 3):
        return None
    node, scale = lookup(softmax.args[0]), 1.0
    masks: list[Any] = []
    while op_name(node) == "relax.add" and len(masks) < MAX_MASKS:
        # the scores' side: the product (scaled), or more masks added to it (T5: a position
        # bias, then the padding mask)
        sides = sorted((node.args, node.args[::-1]), key=lambda pair: _is_add(pair[0], lookup))
        for scores, other in sides:
            if op_name(lookup(scores)) in SCORES_OPS:
                node = lookup(scores)
                masks.append(other)
                break
        else:
            return None
    if op_name(node) in ("relax.multiply", "relax.divide"):
        left, right = node.args
        factor, scores = (_scalar(right), left) if _scalar(right) is not None else (None, None)
        if factor is None and op_name(node) == "relax.multiply":
            factor, scores = _scalar(left), right
        if factor is None or factor == 0.0:
            return None
        scale = factor if op_name(node) == "relax.multiply" else 1.0 / factor
        node = lookup(scores)
    if op_name(node) != "relax.matmul":
        return None
    q, kt = node.args
    shapes = [static_shape(x) for x in (q, kt, v)]
    if any(s is None or len(s) != 4 for s in shapes) or not _all_float32(q, kt, v):
        return None
    (b, h, m, d), kt_shape, (vb, vh, n, e) = shapes  # type: ignore[misc]
    if kt_shape != [b, h, d, n] or (vb, vh) != (b, h):
        return None
    mask_shape = _mask_shape(masks, [b, h, m, n])
    if masks and (mask_shape is None or not _all_float32(*masks)):
        return None
    q_source, q_view = _token_view(q, lookup, [b, h, m, d])
    v_source, v_view = _token_view(v, lookup, [b, h, n, e])
    if q_view is None or v_view is None:  # token-major only with both (the output too)
        q_source, q_view, v_source, v_view = q, None, v, None
    mask_dims = None if mask_shape is None else tuple(mask_shape)
    sizes = Attention(b, h, m, n, d, e, scale, mask_dims, q_view, v_view)
    if not sizes.fits():
        return None
    return sizes, [q_source, kt, v_source, *masks[::-1]]


def _is_add(expr: Any, lookup: Any) -> bool:
    return op_name(lookup(expr)) == "relax.add"


def _mask_shape(masks: list[Any], full: list[int]) -> list[int] | None:
    """The shape of the masks' sum (numpy broadcasting) where each broadcasts to ``full``
    [B, H, M, N]; None where one does not, or is not static, or there are none."""
    found = [static_shape(mask) for mask in masks]
    shapes = [dims for dims in found if dims is not None and len(dims) <= 4]
    if not shapes or len(shapes) != len(found):
        return None
    rank = max(len(dims) for dims in shapes)
    shape = [1] * rank
    for dims in shapes:
        for axis, dim in enumerate([1] * (rank - len(dims)) + list(dims)):
            if dim not in (1, full[4 - rank + axis]):
                return None
            shape[axis] = max(shape[axis], dim)
    return shape


def _past_identity_casts(expr: Any, lookup: Any) -> Any:
    """``expr`` past any astype to its own dtype (GPT-2 casts the probabilities to the value
    dtype, float32 to float32)."""
    while op_name(expr) == "relax.astype":
        source = expr.args[0]
        dtype = str(getattr(getattr(source, "ty", None), "dtype", ""))
        if dtype != str(expr.attrs.dtype):
            break
        expr = lookup(source)
    return expr


def ints(values: Any) -> list[int]:
    return [int(getattr(v, "value", v)) for v in getattr(values, "fields", values)]


def _token_view(x: Any, lookup: Any, shape: list[int]) -> tuple[Any, tuple[int, int] | None]:
    """(source, (columns, offset)) when ``x`` [B, H, T, D] is a split into heads,
    permute_dims(reshape(s, [B, T, H, D]), [0, 2, 1, 3]), of a float32 [B, T, H * D] tensor
    ``s`` that is either a tensor of its own (offset 0) or a slice of the last axis of a
    wider [B, T, C] one (the merged projections of sibling_matmul.py, or a split of a fused
    one; ``_column_slice``); else (x, None)."""
    batch, heads, tokens, depth = shape
    permute = lookup(x)
    if op_name(permute) != "relax.permute_dims" or permute.attrs.axes is None:
        return x, None
    if ints(permute.attrs.axes) != [0, 2, 1, 3]:
        return x, None
    reshape = lookup(permute.args[0])
    if op_name(reshape) != "relax.reshape" or static_shape(reshape) != [
        batch,
        tokens,
        heads,
        depth,
    ]:
        return x, None
    source = reshape.args[0]
    if static_shape(source) != [batch, tokens, heads * depth] or not _all_float32(source):
        return x, None
    return _column_slice(source, lookup, heads * depth) or (source, (heads * depth, 0))


def _column_slice(x: Any, lookup: Any, width: int) -> tuple[Any, tuple[int, int]] | None:
    """(whole, (columns, offset)) when ``x`` is ``width`` columns of the last axis of a
    static [B, T, C] tensor ``whole``: a strided_slice of it, or one part of its split
    (a fused QKV projection split in three); else None."""
    bound = lookup(x)
    whole, offset = None, -1
    if op_name(bound) == "relax.strided_slice" and len(bound.args) == 4:
        axes, begin, end = (ints(arg) for arg in bound.args[1:4])
        if axes in ([2], [-1]) and end[0] - begin[0] == width:
            whole, offset = bound.args[0], begin[0]
    elif hasattr(bound, "tuple_value") and hasattr(bound, "index"):
        split = lookup(bound.tuple_value)
        if op_name(split) == "relax.split" and int(split.attrs.axis) in (2, -1):
            shape = static_shape(split.args[0])
            parts = split.attrs.indices_or_sections
            if shape is not None and len(shape) == 3:
                if hasattr(parts, "value"):  # equal sections
                    starts = list(range(0, shape[2], shape[2] // max(int(parts.value), 1)))
                else:
                    starts = [0, *ints(parts)]
                index = int(bound.index)
                ends = [*starts[1:], shape[2]]
                if index < len(starts) and ends[index] - starts[index] == width:
                    whole, offset = split.args[0], starts[index]
    shape = None if whole is None else static_shape(whole)
    if shape is None or len(shape) != 3 or not 0 <= offset <= shape[2] - width:
        return None
    return whole, (shape[2], offset)


def _all_float32(*exprs: Any) -> bool:
    return all(
        str(getattr(getattr(x, "ty", None), "dtype", "")) == "float32"
        for x in exprs
        if x is not None
    )
