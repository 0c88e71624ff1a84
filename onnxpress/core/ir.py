"""The working IR: convert between onnx.ModelProto and onnx-graphsurgeon's Graph.

``to_graph`` imports a model; ``to_model`` exports a graph in topological order and carries
over what graphsurgeon drops (metadata_props, doc strings, model version, custom opset
imports, training info) from the model it came from. Small helpers for passes live here too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxpress.core.errors import InvalidModelError

logger = logging.getLogger(__name__)


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def to_model(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export ``graph``, keeping the model-level fields of ``template``."""
    toposort(graph)
    opsets = {op.domain: op.version for op in template.opset_import}
    if graph.opset and int(graph.opset) > opsets.get("", 0):  # a pass upgraded the model
        opsets[""] = int(graph.opset)
    for node in graph.nodes:
        if node.domain and node.domain not in opsets:
            opsets[node.domain] = 1
    # graphsurgeon imports optional-typed values (dtype = the element's TypeProto) but cannot
    # export them: they leave as untyped value infos and get their type back afterwards.
    optional = {id(t): t for t in _all_tensors(graph) if getattr(t, "type", "") == "optional_type"}
    kept = {key: t.dtype for key, t in optional.items()}
    try:
        for tensor in optional.values():
            tensor.dtype = None
        model = gs.export_onnx(
            graph,
            do_type_check=False,
            opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()],
        )
    finally:
        for key, tensor in optional.items():
            tensor.dtype = kept[key]
    if optional:
        _restore_optional_types(model.graph, {t.name: kept[k] for k, t in optional.items()})
    _restore_type_attributes(model.graph, _type_attributes(template.graph))
    _restore_collection_types(model.graph, _collection_types(template.graph))
    model.ir_version = template.ir_version
    model.producer_name = template.producer_name
    model.producer_version = template.producer_version
    model.domain = template.domain
    model.model_version = template.model_version
    model.doc_string = template.doc_string
    model.graph.doc_string = template.graph.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    del model.training_info[:]
    model.training_info.extend(template.training_info)
    if not graph.functions and template.functions:
        del model.functions[:]
        model.functions.extend(template.functions)
    return model


def _all_tensors(graph: gs.Graph) -> list[gs.Tensor]:
    """The tensors of ``graph`` and of every subgraph in its nodes' attributes."""
    found = list(graph.tensors().values())
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                found.extend(_all_tensors(value))
    return found


def _restore_optional_types(graph: onnx.GraphProto, elem_types: dict[str, object]) -> None:
    for info in [*graph.input, *graph.output, *graph.value_info]:
        elem = elem_types.get(info.name)
        if isinstance(elem, onnx.TypeProto) and not info.type.WhichOneof("value"):
            info.type.optional_type.elem_type.CopyFrom(elem)
    for node in graph.node:
        for sub in _subgraphs(node):
            _restore_optional_types(sub, elem_types)


def _collection_types(graph: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    """Value name -> type, for the values of ``graph`` and its subgraphs typed as a sequence,
    map or optional: graphsurgeon exports a sequence of maps (scikit-learn's ZipMap output)
    as a sequence of UNDEFINED tensors, which shape inference then rejects."""
    found: dict[str, onnx.TypeProto] = {}
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.WhichOneof("value") not in (None, "tensor_type", "sparse_tensor_type"):
            found[info.name] = info.type
    for node in graph.node:
        for sub in _subgraphs(node):
            found.update(_collection_types(sub))
    return found


def _restore_collection_types(graph: onnx.GraphProto, types: dict[str, onnx.TypeProto]) -> None:
    """Give back its type to each value that left graphsurgeon with an element type lost."""
    if not types:
        return
    for info in [*graph.input, *graph.output, *graph.value_info]:
        kept = types.get(info.name)
        if kept is not None and info.type != kept and _lost_element(info.type):
            info.type.CopyFrom(kept)
    for node in graph.node:
        for sub in _subgraphs(node):
            _restore_collection_types(sub, types)


def _lost_element(kind: onnx.TypeProto) -> bool:
    """Whether ``kind`` holds, at any depth, a tensor of UNDEFINED element type."""
    which = kind.WhichOneof("value")
    if which == "tensor_type":
        return kind.tensor_type.elem_type == onnx.TensorProto.UNDEFINED
    if which == "sequence_type":
        return _lost_element(kind.sequence_type.elem_type)
    if which == "optional_type":
        return _lost_element(kind.optional_type.elem_type)
    if which == "map_type":
        return _lost_element(kind.map_type.value_type)
    return False


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [
        sub
        for attribute in node.attribute
        for sub in ([attribute.g] if attribute.HasField("g") else list(attribute.graphs))
    ]


def _type_attributes(graph: onnx.GraphProto) -> dict[str, list[onnx.AttributeProto]]:
    """TYPE_PROTO attributes (e.g. Optional's ``type``), which graphsurgeon drops on import,
    keyed by the first output of their node, in ``graph`` and its subgraphs."""
    found: dict[str, list[onnx.AttributeProto]] = {}
    for node in graph.node:
        kept = [a for a in node.attribute if a.type in (onnx.AttributeProto.TYPE_PROTO, onnx.AttributeProto.TYPE_PROTOS)]  # fmt: skip
        if kept and node.output:
            found[node.output[0]] = kept
        for sub in _subgraphs(node):
            found.update(_type_attributes(sub))
    return found


def _restore_type_attributes(
    graph: onnx.GraphProto, attributes: dict[str, list[onnx.AttributeProto]]
) -> None:
    if not attributes:
        return
    for node in graph.node:
        have = {a.name for a in node.attribute}
        for attribute in attributes.get(node.output[0] if node.output else "", []):
            if attribute.name not in have:
                node.attribute.append(attribute)
        for sub in _subgraphs(node):
            _restore_type_attributes(sub, attributes)


def toposort(graph: gs.Graph) -> None:
    """``graph.toposort()`` in linear time, with the same resulting order.

    graphsurgeon sorts nodes stably by depth (1 + the depth of the deepest producer), ties in
    the order its depth-first search finishes them; its search is recursive and re-scans the
    graph's tensors, which costs seconds at 80k nodes. This is the same search, iterative.
    Graphs with functions or subgraphs (If, Loop, Scan) are left to graphsurgeon.
    """
    nodes = list(graph.nodes)
    if graph.functions or any(
        isinstance(v, gs.Graph) for node in nodes for v in node.attrs.values()
    ):
        graph.toposort()
        return
    index = {id(node): i for i, node in enumerate(nodes)}
    local = {t.name for node in nodes for t in node.outputs if t.name}
    local.update(t.name for t in graph.inputs)
    producers: list[list[int]] = []
    for node in nodes:
        found: dict[int, None] = {}  # ordered set, as graphsurgeon's dict of producers
        for tensor in node.inputs:
            if tensor.name in local or (isinstance(tensor, gs.Constant) and tensor.name):
                for producer in tensor.inputs:
                    if id(producer) not in index:
                        raise ValueError(
                            f"node '{producer.name}' ({producer.op}) produces '{tensor.name}' "
                            "but is not in the graph"
                        )
                    found[index[id(producer)]] = None
        producers.append(list(found))
    depth: dict[int, int] = {}  # node index -> depth, in the order the search finishes
    for root in range(len(nodes)):
        if root in depth:
            continue
        stack = [(root, iter(producers[root]))]
        on_path = {root}
        while stack:
            i, pending = stack[-1]
            for j in pending:
                if j in depth:
                    continue
                if j in on_path:
                    raise ValueError(f"cycle in the graph through node '{nodes[j].name}'")
                on_path.add(j)
                stack.append((j, iter(producers[j])))
                break
            else:
                stack.pop()
                on_path.discard(i)
                depth[i] = 1 + max((depth[j] for j in producers[i]), default=-1)
    graph.nodes = [nodes[i] for i in sorted(depth, key=depth.__getitem__)]


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def dependency_graph(nodes: Iterable[onnx.NodeProto]) -> nx.DiGraph:
    """Node-index DiGraph with an edge producer -> consumer for every tensor."""
    node_list = list(nodes)
    producers: dict[str, int] = {}
    for i, node in enumerate(node_list):
        for out in node.output:
            if out:
                producers[out] = i
    dg = nx.DiGraph()
    dg.add_nodes_from(range(len(node_list)))
    for i, node in enumerate(node_list):
        for name in node.input:
            j = producers.get(name)
            if j is not None:
                dg.add_edge(j, i)
    return dg


def ensure_acyclic_sorted(model: onnx.ModelProto, source: str) -> bool:
    """Raise InvalidModelError naming a cycle; sort the nodes in place if out of order.

    Returns True when the node order was changed.
    """
    nodes = list(model.graph.node)
    seen: set[str] = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    in_order = True
    for node in nodes:
        if any(name and name not in seen for name in node.input):
            in_order = False
            break
        seen.update(node.output)
    if in_order:
        return False
    dg = dependency_graph(nodes)
    try:
        cycle = nx.find_cycle(dg)
    except nx.NetworkXNoCycle:
        cycle = []
    if cycle:
        names = [nodes[u].name or f"#{u}({nodes[u].op_type})" for u, _ in cycle]
        names.append(names[0])
        raise InvalidModelError(f"{source}: graph has a cycle: {' -> '.join(names)}")
    order = list(nx.lexicographical_topological_sort(dg))
    del model.graph.node[:]
    model.graph.node.extend(nodes[i] for i in order)
    logger.info("%s: nodes were not in topological order; sorted them", source)
    return True


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The array behind a gs.Constant, or None for variables."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None


def single_consumer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.outputs[0] if len(tensor.outputs) == 1 else None


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def unique_name(graph: gs.Graph, base: str, taken: set[str] | None = None) -> str:
    """A tensor/node name not yet used in ``graph`` (pass ``taken`` to amortise lookups)."""
    names = taken if taken is not None else set(graph.tensors()) | {n.name for n in graph.nodes}
    candidate = base
    i = 1
    while candidate in names:
        candidate = f"{base}_{i}"
        i += 1
    names.add(candidate)
    return candidate


def own_constant(
    graph: gs.Graph, node: gs.Node, index: int, taken: set[str] | None = None
) -> gs.Constant:
    """Input ``index`` of ``node``, a constant, as one that ``node`` alone reads: a constant
    other nodes (or the graph's outputs) read too is copied for ``node`` first, so that
    writing its values changes this node only (exporters share equal biases)."""
    constant = node.inputs[index]
    if not isinstance(constant, gs.Constant):
        raise TypeError(f"input {index} of '{node.name}' is not a constant")
    if len(constant.outputs) <= 1 and not is_graph_output(graph, constant):
        return constant
    values = constant.values
    array = np.array(values.load() if hasattr(values, "load") else values, copy=True)
    copy = gs.Constant(unique_name(graph, f"{constant.name}_{node.name}", taken), array)
    node.inputs[index] = copy
    return copy


def adopt(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """Make ``graph`` hold ``model``'s graph (a pass that rewrote the exported proto)."""
    rewritten = gs.import_onnx(model)
    graph.nodes = rewritten.nodes
    graph.inputs = rewritten.inputs
    graph.outputs = rewritten.outputs


def replace_node(graph: gs.Graph, node: gs.Node, new_nodes: list[gs.Node]) -> None:
    """Put ``new_nodes`` (which already write ``node``'s outputs) in ``node``'s place in the
    node list, and detach ``node`` from its tensors."""
    position = graph.nodes.index(node)
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes[position : position + 1] = new_nodes


def detach_removed_nodes(graph: gs.Graph) -> int:
    """Drop links from live tensors to nodes that are no longer in ``graph.nodes``.

    A pass that removes a node by rebuilding ``graph.nodes`` leaves the node in its tensors'
    producer/consumer lists; later passes would then see phantom consumers. Returns the
    number of stale links removed. Linear in the graph size.
    """
    live = {id(node) for node in graph.nodes}
    removed = 0
    seen: set[int] = set()
    for node in graph.nodes:
        for tensor in [*node.inputs, *node.outputs]:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            for links in (tensor.inputs, tensor.outputs):
                kept = [n for n in links if id(n) in live]
                if len(kept) != len(links):
                    removed += len(links) - len(kept)
                    # Plain list operations: the dead nodes must not be touched.
                    list.clear(links)
                    list.extend(links, kept)
    return removed


def remove_dead_nodes(graph: gs.Graph) -> int:
    """Remove nodes that no graph output depends on; return how many were removed.

    Linear in the graph (graphsurgeon's cleanup unlinks node by node with value
    comparisons, quadratic in the readers of a shared weight). Graphs whose nodes hold
    subgraphs, which may read outer tensors implicitly, go to graphsurgeon's cleanup.
    """
    if any(isinstance(v, gs.Graph) for node in graph.nodes for v in node.attrs.values()):
        before = len(graph.nodes)
        graph.cleanup(remove_unused_node_outputs=False, remove_unused_graph_inputs=False)
        return before - len(graph.nodes)
    live: set[int] = set()
    stack = [t for t in graph.outputs]
    seen: set[int] = set()
    while stack:
        tensor = stack.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        for node in tensor.inputs:
            if id(node) not in live:
                live.add(id(node))
                stack.extend(node.inputs)
    dead = [n for n in graph.nodes if id(n) not in live]
    if not dead:
        return 0
    dead_ids = {id(n) for n in dead}
    for node in dead:
        for tensor in node.inputs:
            kept = [c for c in tensor.outputs if id(c) not in dead_ids]
            list.clear(tensor.outputs)
            list.extend(tensor.outputs, kept)
        for tensor in node.outputs:
            list.clear(tensor.inputs)
        list.clear(node.inputs)
        list.clear(node.outputs)
    graph.nodes = [n for n in graph.nodes if id(n) in live]
    return len(dead)
