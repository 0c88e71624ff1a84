"""Channel rules for multi-head attention: the head split, the ops between, the fused forms.

A projection's channels c = h·Dh + d, split by a Reshape [.., C] -> [.., H, Dh], become
``Heads``: head h on ``head_axis`` and dimension d on ``dim_axis``. The rules here follow them:

* Transpose moves both axes; elementwise ops with operands broadcast over both (a scale, a
  mask over the sequence), Softmax over another axis and Cast / Identity / Dropout pass them;
* MatMul(q, kᵀ) contracts q's dims with k's: the two projections' channels are identified one
  to one (head h, dimension d of q with the same of k) and the scores keep the heads only;
* MatMul(scores, v) ties the heads of the scores (query/key) to those of the values: an
  ``AttentionSite`` (query/key channels, value channels, heads) that can drop whole heads from
  both, or the same number of dimensions from every head of either;
* a Reshape [.., H, Dh] -> [.., H·Dh] merges the heads back into flat channels.

Fused forms are sites of their own: onnxruntime's com.microsoft ``MultiHeadAttention`` (3-D
query, key, value), com.microsoft ``Attention`` (one [D, Hq+Hk+Hv] weight: it opens the
query, key and value spaces itself) and the opset-23 ``Attention`` (3-D with ``q_num_heads``,
or 4-D ``Heads``). A node that reads heads without a rule here refuses their channels, and so
does what a pruned head cannot follow: KV caches, per-head masks or biases, grouped-query
attention, rotary embeddings, a head split of channels from several layers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import onnx_graphsurgeon as gs

from onnxpress.analysis.channels.layout import Layout, node_key
from onnxpress.analysis.channels.moves import Rule
from onnxpress.analysis.channels.trace import Tracer, attr, constant_array, is_used


@dataclass(frozen=True)
class Heads:
    """Flat channels (``layout``, ``heads``·``dim`` long) split over two axes of a tensor."""

    layout: Layout
    heads: int
    dim: int
    head_axis: int
    dim_axis: int | None  # None once the dimensions are contracted (attention scores)


@dataclass(frozen=True)
class Site:
    """One attention computation as the walk met it (layouts before grouping)."""

    name: str
    query: Layout  # the query/key channels (the query's space; the key's is identified)
    value: Layout
    heads: int


@dataclass(frozen=True)
class HeadShape:
    """A Reshape that splits (``split``) or merges the heads of ``layout``: the trailing
    entries of its shape input are [H, Dh] or [H·Dh]."""

    layout: Layout
    dim: int
    split: bool


def shape_tail(tensor: gs.Tensor, count: int) -> list[int] | None:
    """The last ``count`` entries of a shape input: a constant, or a Concat (axis 0) whose
    trailing operands are constants (the batch and sequence entries may be computed)."""
    value = constant_array(tensor)
    if value is not None:
        flat = [int(v) for v in value.reshape(-1)]
        return flat[-count:] if len(flat) >= count else None
    concat = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if concat is None or concat.op != "Concat" or int(attr(concat, "axis", 0)) != 0:
        return None
    tail: list[int] = []
    for operand in reversed(concat.inputs):
        part = constant_array(operand)
        if part is None:
            return None
        tail = [int(v) for v in part.reshape(-1)] + tail
        if len(tail) >= count:
            return tail[-count:]
    return None


def _refuse_heads(t: Tracer, node: gs.Node, reason: str) -> None:
    for tensor in node.inputs:
        heads = t.heads.get(tensor.name) if tensor.name else None
        if heads is not None:
            t.refuse(heads.layout, node, reason)
    t.refuse_inputs(node, reason)


def head_split(t: Tracer, node: gs.Node) -> bool:
    """Reshape [.., C] -> [.., H, Dh] of flat channels on the last axis: True if handled."""
    layout, rank = t.layout(node.inputs[0]), t.rank(node.inputs[0])
    dims_out = t.dims(node.outputs[0])
    tail = shape_tail(node.inputs[1], 2) if len(node.inputs) > 1 else None
    if layout is None or rank is None or tail is None or layout.axis != rank - 1:
        return False
    if dims_out is not None and len(dims_out) != rank + 1:
        return False
    heads, dim = tail
    length = t.length(layout)
    if heads == -1 and dim > 0 and length % dim == 0:  # view(.., -1, Dh) / view(.., H, -1)
        heads = length // dim
    elif dim == -1 and heads > 0 and length % heads == 0:
        dim = length // heads
    if heads < 1 or dim < 1 or heads * dim != length:
        return False
    if len(layout.segments) != 1 or layout.segments[0].block != 1:
        t.refuse(layout, node, "splits into heads the channels of several layers or blocks")
        return True
    t.heads[node.outputs[0].name] = Heads(layout, heads, dim, rank - 1, rank)
    t.head_shapes[node_key(node)] = HeadShape(layout, dim, split=True)
    return True


def _merge(t: Tracer, node: gs.Node, heads: Heads) -> None:
    rank = t.rank(node.inputs[0])
    tail = shape_tail(node.inputs[1], 1) if len(node.inputs) > 1 else None
    merged = heads.dim_axis is not None and heads.dim_axis == heads.head_axis + 1
    if rank is None or tail is None or not merged or heads.dim_axis != rank - 1:
        t.refuse(heads.layout, node, "reshapes the heads other than [.., H, Dh] -> [.., H·Dh]")
        return
    if tail[0] not in (-1, heads.heads * heads.dim):
        t.refuse(heads.layout, node, "the merged size is not H·Dh")
        return
    t.set(node.outputs[0], Layout(rank - 2, heads.layout.segments))
    t.head_shapes[node_key(node)] = HeadShape(heads.layout, heads.dim, split=False)


def _transpose(t: Tracer, node: gs.Node, heads: Heads) -> None:
    rank = t.rank(node.inputs[0])
    if rank is None:
        t.refuse(heads.layout, node, "unknown rank")
        return
    perm = [int(p) for p in attr(node, "perm", list(range(rank))[::-1])]
    dim = None if heads.dim_axis is None else perm.index(heads.dim_axis)
    t.heads[node.outputs[0].name] = replace(
        heads, head_axis=perm.index(heads.head_axis), dim_axis=dim
    )


def _elementwise(t: Tracer, node: gs.Node, heads: Heads) -> None:
    """Operands other than the heads broadcast over the head and dimension axes."""
    out_rank = t.rank(node.outputs[0])
    axes = [a for a in (heads.head_axis, heads.dim_axis) if a is not None]
    for x in node.inputs:
        if not x.name or t.heads.get(x.name) is heads:
            continue
        dims = t.dims(x)
        if x.name in t.heads or t.layout(x) is not None or dims is None or out_rank is None:
            _refuse_heads(t, node, "an operand of the heads carries channels or has unknown shape")
            break
        offset = out_rank - len(dims)
        if any(a - offset >= 0 and dims[a - offset] != 1 for a in axes):
            _refuse_heads(t, node, f"operand '{x.name}' differs per head (or per head dimension)")
            break  # the heads go on, refused, so that the site still names its parts
    t.heads[node.outputs[0].name] = heads


def _softmax(t: Tracer, node: gs.Node, heads: Heads) -> None:
    rank = t.rank(node.inputs[0])
    if rank is None:
        t.refuse(heads.layout, node, "unknown rank")
        return
    axis = int(attr(node, "axis", -1 if t.opset >= 13 else 1)) % rank
    over = {heads.head_axis, heads.dim_axis} - {None}
    if axis in over or (t.opset < 13 and axis <= max(a for a in over if a is not None)):
        t.refuse(heads.layout, node, "normalizes over the heads")
    t.heads[node.outputs[0].name] = heads


def _matmul(t: Tracer, node: gs.Node, heads: Heads) -> None:
    a, b = (t.heads.get(x.name) for x in node.inputs[:2])
    rank = t.rank(node.outputs[0])
    if a is None or b is None or rank is None or a.heads != b.heads or a.head_axis != b.head_axis:
        _refuse_heads(t, node, "a MatMul of heads with something other than heads")
        return
    if a.head_axis >= rank - 2:
        _refuse_heads(t, node, "the heads are on a contracted axis")
        return
    if a.dim_axis == rank - 1 and b.dim_axis == rank - 2:  # q·kᵀ: dims contracted
        if a.dim != b.dim:
            _refuse_heads(t, node, "query and key head sizes differ")
            return
        t.identify(node, [a.layout, b.layout])
        t.heads[node.outputs[0].name] = replace(a, dim_axis=None)
        t.scaled[node_key(node)] = [(1.0, [a.layout])]
    elif a.dim_axis is None and b.dim_axis == rank - 1:  # softmax(scores)·v
        t.sites.append(Site(node.name or node_key(node), a.layout, b.layout, a.heads))
        t.heads[node.outputs[0].name] = b
        t.scaled[node_key(node)] = [(1.0, [b.layout])]
    else:
        _refuse_heads(t, node, "a MatMul of heads that is not q·kᵀ or scores·v")


def _head_mask_refusal(t: Tracer, node: gs.Node, index: int, head_axis: int) -> str | None:
    """Why a mask / bias input (4-D, heads on ``head_axis``) blocks pruning heads."""
    if len(node.inputs) <= index or not node.inputs[index].name:
        return None
    dims = t.dims(node.inputs[index])
    if dims is None or (len(dims) == 4 and dims[head_axis] != 1):
        return f"input '{node.inputs[index].name}' is per head (or of unknown shape)"
    return None


def _fused_refusal(t: Tracer, node: gs.Node, caches: range, presents: range) -> str | None:
    if any(len(node.inputs) > i and node.inputs[i].name for i in caches):
        return "KV cache inputs (past key / value)"
    if any(len(node.outputs) > i and is_used(node.outputs[i], t) for i in presents):
        return "KV cache or score outputs are used"
    return None


def _known_output(t: Tracer, node: gs.Node, like: gs.Tensor, value: Layout) -> None:
    """Shape inference does not type the contrib ops: the output is ``like``'s shape with
    the value channels last."""
    dims = t.dims(like)
    if dims and t.dims(node.outputs[0]) is None:
        t.shapes.shapes[node.outputs[0].name] = [*dims[:-1], t.length(value)]


def _qkv_site(
    t: Tracer, node: gs.Node, query: Layout, key: Layout, value: Layout, heads: int
) -> bool:
    if t.length(query) != t.length(key) or any(t.length(x) % heads for x in (query, value)):
        return False
    t.identify(node, [query, key])
    share = t.length(query) / (t.length(query) + t.length(value))
    t.scaled[node_key(node)] = [(share, [query]), (1 - share, [value])]
    t.sites.append(Site(node.name or node_key(node), query, value, heads))
    return True


def attention_op(t: Tracer, node: gs.Node) -> None:
    """Opset-23 Attention: Q, K, V as Heads [B, H, S, Dh], or 3-D with q_num_heads."""
    q, k, v = node.inputs[:3]
    heads4 = [t.heads.get(x.name) for x in (q, k, v)]
    if all(h is not None for h in heads4):
        hq, hk, hv = heads4
        assert hq is not None and hk is not None and hv is not None
        axes_ok = all(h.head_axis == 1 and h.dim_axis == 3 for h in heads4 if h is not None)
        reason = _fused_refusal(t, node, range(4, 6), range(1, 4))
        reason = reason or _head_mask_refusal(t, node, 3, 1)
        if reason or not axes_ok or len({hq.heads, hk.heads, hv.heads}) != 1:
            _refuse_heads(t, node, reason or "grouped-query attention or heads not on axis 1")
            return
        if not _qkv_site(t, node, hq.layout, hk.layout, hv.layout, hq.heads):
            _refuse_heads(t, node, "query and key sizes differ")
            return
        t.heads[node.outputs[0].name] = hv
        return
    layouts = [t.layout(x) for x in (q, k, v)]
    ranks = [t.rank(x) for x in (q, k, v)]
    q_heads, kv_heads = attr(node, "q_num_heads", 0), attr(node, "kv_num_heads", 0)
    reason = _fused_refusal(t, node, range(4, 6), range(1, 4)) or _head_mask_refusal(t, node, 3, 1)
    if any(h is not None for h in heads4) or any(x is None for x in layouts) or ranks != [3] * 3:
        reason = reason or "query, key and value are not all 3-D channels or all split heads"
    elif q_heads != kv_heads or q_heads < 1:
        reason = reason or f"grouped-query attention ({q_heads} query, {kv_heads} key heads)"
    if reason is None and all(x is not None and x.axis == 2 for x in layouts):
        lq, lk, lv = (x for x in layouts if x is not None)
        if _qkv_site(t, node, lq, lk, lv, int(q_heads)):
            t.set(node.outputs[0], lv)
            return
    _refuse_heads(t, node, reason or "query and key sizes differ")


def multi_head_attention(t: Tracer, node: gs.Node) -> None:
    """com.microsoft MultiHeadAttention with 3-D query, key and value channels."""
    q, k, v = (node.inputs + [gs.Variable.empty()] * 3)[:3]
    layouts = [t.layout(x) for x in (q, k, v)]
    heads = int(attr(node, "num_heads", 0))
    bias = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
    reason = _fused_refusal(t, node, range(6, 10), range(1, 3)) or _head_mask_refusal(t, node, 5, 1)
    if bias is not None and constant_array(bias) is None:
        reason = reason or "the bias is not a constant"
    if any(
        x is None or x.axis != 2 or t.rank(y) != 3 for x, y in zip(layouts, (q, k, v), strict=True)
    ):
        reason = reason or "query, key and value are not 3-D channels (packed forms)"
    if reason is None and heads > 0:
        lq, lk, lv = (x for x in layouts if x is not None)
        if _qkv_site(t, node, lq, lk, lv, heads):
            _known_output(t, node, q, lv)
            t.set(node.outputs[0], lv)
            return
    _refuse_heads(t, node, reason or "query and key sizes differ")


def fused_attention(t: Tracer, node: gs.Node) -> None:
    """com.microsoft Attention: input [B, S, D] · weight [D, Hq+Hk+Hv] (+ bias) opens the
    query, key and value spaces; the output [B, S, Hv] carries the values."""
    weight = constant_array(node.inputs[1])
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    heads = int(attr(node, "num_heads", 0))
    sizes = [int(s) for s in attr(node, "qkv_hidden_sizes", [])]
    if weight is None or weight.ndim != 2 or (bias is not None and constant_array(bias) is None):
        t.refuse_inputs(node, "weight or bias is not a constant matrix")
        return
    sizes = sizes or [weight.shape[1] // 3] * 3
    t.consume(node, node.inputs[0], 2, "channels are not the contracted (last) axis")
    own = t.new_producer(node, sum(sizes), 2)
    starts = [0, sizes[0], sizes[0] + sizes[1]]
    parts = [t.spaces.part(own, a, a + s) for a, s in zip(starts, sizes, strict=True)]
    query, key, value = (p if p is not None else own for p in parts)
    reason = _fused_refusal(t, node, range(4, 5), range(1, 2)) or _head_mask_refusal(t, node, 5, 1)
    if attr(node, "do_rotary", 0):
        reason = reason or "rotary embeddings pair the head dimensions"
    if reason is None and heads > 0 and not _qkv_site(t, node, query, key, value, heads):
        reason = "query and key sizes differ"
    if reason is not None:
        t.refuse(own, node, reason)
    t.scaled.pop(node_key(node), None)  # a producer: its MACs scale with its own channels
    _known_output(t, node, node.inputs[0], value)
    t.set(node.outputs[0], Layout(2, value.segments))


_PASS = {"Identity", "Cast", "Dropout"}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Where"}
_HEAD_RULES = {"Transpose": _transpose, "Softmax": _softmax, "MatMul": _matmul}


def head_rule(t: Tracer, node: gs.Node, fallback: Rule) -> Rule:
    """The rule for a node that reads heads, splits them or is a fused attention op; else
    ``fallback`` (the ordinary rule)."""
    default = node.domain in (None, "", "ai.onnx")
    if node.domain == "com.microsoft" and node.op == "MultiHeadAttention":
        return multi_head_attention
    if node.domain == "com.microsoft" and node.op == "Attention":
        return fused_attention
    if default and node.op == "Attention":
        return attention_op
    heads = next((t.heads[x.name] for x in node.inputs if x.name in t.heads), None)
    if heads is None:
        if default and node.op == "Reshape":
            return lambda tr, n: None if head_split(tr, n) else fallback(tr, n)
        return fallback
    if not default:
        return lambda tr, n: _refuse_heads(tr, n, "no channel rule for this op reading heads")
    if node.op == "Reshape":
        return lambda tr, n: _merge(tr, n, heads)
    if node.op in _PASS:
        return lambda tr, n: tr.heads.__setitem__(n.outputs[0].name, heads)
    if node.op in _ELEMENTWISE:
        return lambda tr, n: _elementwise(tr, n, heads)
    if node.op in _HEAD_RULES:
        rule = _HEAD_RULES[node.op]
        return lambda tr, n: rule(tr, n, heads)
    return lambda tr, n: _refuse_heads(tr, n, "no channel rule for this op reading heads")


@dataclass(frozen=True)
class AttentionSite:
    """Heads that can be pruned together: query/key channels (group ``query``: head h owns
    channels h·qk_dim ..) and value channels (group ``value``), the same heads in both."""

    name: str
    heads: int
    query: int
    value: int
    qk_dim: int
    vo_dim: int


def attention_sites(t: Tracer, group_of: dict[int, int]) -> list[AttentionSite]:
    """One record per site; refuse (before the groups read their reasons) the channels of a
    site that spans several layers, or whose groups take part in another site or role."""
    sites: list[AttentionSite] = []
    roles: dict[int, tuple[int, str]] = {}
    for index, site in enumerate(t.sites):
        layouts = [t.spaces.expand(site.query), t.spaces.expand(site.value)]
        groups = [group_of[lay.segments[0].space] for lay in layouts]
        for layout in layouts:
            if len(layout.segments) != 1 or layout.segments[0].block != 1:
                t.spaces.refuse(layout, f"attention '{site.name}': heads span several layers")
        for role, group in zip(("query", "value"), groups, strict=True):
            if roles.setdefault(group, (index, role)) != (index, role):
                for layout in layouts:
                    t.spaces.refuse(
                        layout, f"attention '{site.name}': channels shared with another site"
                    )
        sizes = [t.spaces.sizes[lay.segments[0].space] for lay in layouts]
        sites.append(
            AttentionSite(
                site.name,
                site.heads,
                groups[0],
                groups[1],
                sizes[0] // site.heads,
                sizes[1] // site.heads,
            )
        )
    return sites
