"""How large a model is serialized, and its digest, without serializing its weights.

protobuf's ``ByteSize`` encodes the whole message to measure it: 0.9 s for a 430 MB
BERT-base, paid by every caller (the pass manager's size checks, the report's ``bytes``
column, the save path's external-data decision). Here a tensor that holds its values in
``raw_data`` is measured from its header and its byte count, by the wire format's rules
(a length-delimited field is its tag, the varint of its length, then its bytes), so the
size is exact and costs what the graph's structure costs. The digest hashes those raw
bytes as they are beside the rest serialized.
"""

from __future__ import annotations

import hashlib

import onnx
from google.protobuf.message import Message

# Leave headroom under protobuf's 2 GB limit for the graph structure itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# ModelProto.graph (7), GraphProto.initializer (5) and TensorProto.raw_data (9): one-byte tags.
_TAG_BYTES = 1


def _varint_bytes(value: int) -> int:
    count = 1
    while value >= 0x80:
        value >>= 7
        count += 1
    return count


def _field_bytes(length: int) -> int:
    """Bytes of a length-delimited field (tag, length, payload) whose payload is ``length``."""
    return _TAG_BYTES + _varint_bytes(length) + length


def _size_without(message: Message, field: str) -> int:
    """``message.ByteSize()`` as if ``field`` were unset, without encoding that field."""
    rest = type(message)()
    for descriptor, value in message.ListFields():
        if descriptor.name == field:
            continue
        if descriptor.is_repeated:
            getattr(rest, descriptor.name).extend(value)
        elif descriptor.type == descriptor.TYPE_MESSAGE:
            getattr(rest, descriptor.name).CopyFrom(value)
        else:
            setattr(rest, descriptor.name, value)
    return int(rest.ByteSize())


def tensor_size(tensor: onnx.TensorProto) -> int:
    """``tensor.ByteSize()``, its raw values counted, not encoded."""
    raw = tensor.raw_data
    if not raw:
        return int(tensor.ByteSize())
    return _size_without(tensor, "raw_data") + _field_bytes(len(raw))


def serialized_size(model: onnx.ModelProto) -> int:
    """Bytes of ``model`` serialized (what ``ByteSize`` returns), whatever its size: the
    initializers' raw values are counted, not encoded. Tensors stored externally count as
    their references, as in ``ByteSize``."""
    if not model.HasField("graph"):
        return int(model.ByteSize())
    graph = model.graph
    graph_size = _size_without(graph, "initializer")
    graph_size += sum(_field_bytes(tensor_size(t)) for t in graph.initializer)
    return _size_without(model, "graph") + _field_bytes(graph_size)


def too_large_to_serialize(model: onnx.ModelProto) -> bool:
    """Whether ``model`` passes ``EXTERNAL_DATA_THRESHOLD`` serialized. Decided from its
    tensors' shapes while they hold less than half of it, else measured exactly."""
    if tensor_bytes(model.graph) < EXTERNAL_DATA_THRESHOLD // 2:
        return False
    return serialized_size(model) > EXTERNAL_DATA_THRESHOLD


def tensor_bytes(graph: onnx.GraphProto) -> int:
    """Bytes of the tensors of ``graph`` and its subgraphs (initializers, Constant values),
    from their shapes and element types (16 bytes a string element), plus 1 KiB a node."""
    total = len(graph.node) * 1024
    tensors = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                tensors.append(attr.t)
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                total += tensor_bytes(sub)
    for tensor in tensors:
        count = 1
        for dim in tensor.dims:
            count *= int(dim)
        if tensor.data_type == onnx.TensorProto.STRING:
            total += 16 * count
        else:
            total += count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return total


def model_digest(model: onnx.ModelProto) -> bytes | None:
    """SHA-256 of the model: everything but the initializers' raw bytes serialized, then
    those bytes as they are (serializing a 430 MB BERT-base whole took 0.9 s of the 1.2 s,
    for every pass); None when it is too large to serialize in one piece."""
    if too_large_to_serialize(model):
        return None
    graph = model.graph
    skeleton = onnx.GraphProto(name=graph.name, doc_string=graph.doc_string)
    for field in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(skeleton, field).extend(getattr(graph, field))
    shell = onnx.ModelProto(ir_version=model.ir_version, graph=skeleton)
    shell.opset_import.extend(model.opset_import)
    shell.functions.extend(model.functions)
    digest = hashlib.sha256(shell.SerializeToString())
    for tensor in graph.initializer:
        raw = tensor.raw_data
        if not raw:
            digest.update(tensor.SerializeToString())
            continue
        header = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type)
        header.dims.extend(tensor.dims)
        digest.update(header.SerializeToString())
        digest.update(len(raw).to_bytes(8, "little"))
        digest.update(raw)
    return digest.digest()
