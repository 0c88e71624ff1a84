"""The channel-group analysis: which channels are coupled, where they lie, and refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from channel_graphs import (
    IMAGE,
    Net,
    block_model,
    chain_model,
    flatten_model,
    grouped_model,
    gru_model,
    residual_se_model,
    split_slice_model,
)

from onnxpress import PassContext
from onnxpress.analysis.channels.groups import ChannelGroup, ChannelGroups
from onnxpress.core.ir import to_graph


def analyse(model: onnx.ModelProto) -> tuple[ChannelGroups, dict[str, ChannelGroup]]:
    ctx = PassContext(template=model, original=model)
    groups = ctx.analysis(ChannelGroups, to_graph(model))
    return groups, {g.name: g for g in groups.groups}


def test_chain_through_bn_pool_pad_resize_is_one_group() -> None:
    groups, named = analyse(chain_model())
    conv1 = named["conv1"]
    assert conv1.prunable and conv1.size == 8
    assert conv1.producers == ("conv1",) and conv1.consumers == ("y",) and conv1.norms == ("bn1",)
    assert {name for name, lay in groups.layouts.items() if groups.spans(lay)[0][1] == 0} == {
        "conv1",
        "bn1",
        "relu1",
        "pool",
        "pad",
        "resize",
    }
    assert named["y"].refusals == ("reaches graph output 'y'",)


def test_residual_and_squeeze_excitation_couple_three_producers() -> None:
    _, named = analyse(residual_se_model())
    stem = named["stem"]
    assert stem.producers == ("stem", "c2", "se_expand")
    assert set(stem.consumers) == {"c1", "se_reduce", "y"} and stem.norms == ("inorm",)
    assert named["c1"].consumers == ("c2",) and named["se_reduce"].consumers == ("se_expand",)


def test_concat_lays_groups_end_to_end_and_depthwise_passes_them_on() -> None:
    groups, named = analyse(block_model())
    a, b, stem = named["conv_a"], named["conv_b"], named["stem"]
    assert stem.producers == ("stem", "conv_p") and set(stem.consumers) == {"conv_a", "conv_b", "y"}
    assert a.consumers == b.consumers == ("conv_p",)
    kept = {a.index: np.array([1, 3]), b.index: np.array([0])}
    # conv_p reads Concat(a, b) through the depthwise conv: b starts at offset 4.
    assert groups.tensor_indices("dw_relu", kept).tolist() == [1, 3, 4]
    assert groups.tensor_indices("cat", kept).tolist() == [1, 3, 4]
    assert "dw" in groups.depthwise


def test_depthwise_multiplier_spreads_each_channel_over_a_block() -> None:
    net = Net()
    h = net.conv(net.op("Relu", [net.conv("x", "c1", 3, 4)], "r"), "dw", 4, 8, group=4)
    net.conv(h, "y", 8, 2)
    groups, named = analyse(net.model(IMAGE, ["y"]))
    c1 = named["c1"]
    assert c1.consumers == ("y",)
    assert groups.tensor_indices("dw", {c1.index: np.array([0, 2])}).tolist() == [0, 1, 4, 5]


def test_grouped_conv_identifies_its_partitions() -> None:
    groups, named = analyse(grouped_model())
    conv1, gconv = named["conv1"], named["gconv"]
    assert conv1.size == 4 and len(conv1.members) == 2  # 8 channels = 2 partitions of 4
    assert gconv.size == 3 and gconv.consumers == ("y",)
    assert groups.tensor_indices("relu1", {conv1.index: np.array([0, 3])}).tolist() == [0, 3, 4, 7]


@pytest.mark.parametrize("reshape", [False, True])
def test_flatten_or_reshape_into_a_dense_layer_maps_a_channel_to_a_block(reshape: bool) -> None:
    groups, named = analyse(flatten_model(reshape))
    conv = named["conv"]
    assert conv.prunable and conv.consumers == ("y",)
    tensor = "reshape" if reshape else "flatten"
    kept = groups.tensor_indices(tensor, {conv.index: np.array([2])})
    assert kept.tolist() == list(range(32, 48))  # 4x4 features per channel


def test_split_and_slice_cut_one_producer_into_groups() -> None:
    groups, named = analyse(split_slice_model())
    assert {n: g.size for n, g in named.items()} == {
        "conv[0:3]": 3,
        "conv[3:4]": 1,
        "conv[4:8]": 4,
        "y": 2,
    }
    first, last = named["conv[0:3]"], named["conv[4:8]"]
    kept = {first.index: np.array([0, 2]), last.index: np.array([1, 3])}
    assert groups.tensor_indices("conv", kept).tolist() == [0, 2, 3, 5, 7]
    assert groups.tensor_indices("cat", kept).tolist() == [0, 2, 4, 6]


def test_gru_hidden_units_reach_the_head_through_squeeze() -> None:
    groups, named = analyse(gru_model())
    gru = named["gru"]
    assert gru.prunable and gru.size == 8 and gru.consumers == ("y",)
    assert groups.layouts["gru_1"].axis == 2 and groups.layouts["last"].axis == 1


def test_transpose_moves_the_channel_axis_to_a_matmul() -> None:
    net = Net()
    h = net.op("Transpose", [net.conv("x", "conv", 3, 4)], "nhwc", perm=[0, 2, 3, 1])
    net.op("MatMul", [h, net.weight("w", (4, 2))], "y")
    groups, named = analyse(net.model(IMAGE, ["y"]))
    assert named["conv"].consumers == ("y",) and groups.layouts["nhwc"].axis == 3


def _refusal(build: str) -> str:
    """The refusal of the first conv's group in a small graph; ``build`` picks the case."""
    net = Net()
    h = net.conv("x", "c1", 3, 4)
    outputs = ["y"]
    if build == "output":
        outputs.append("c1")
    elif build == "shape":
        outputs.append(net.op("Shape", [h], "shape"))
    elif build == "unknown":
        h = net.op("LRN", [h], "lrn", size=3)
    elif build == "pad":
        h = net.op("Pad", [h, net.const("pads", [0, 1, 0, 0, 0, 1, 0, 0])], "pad")
    elif build == "input":
        h = net.op("Add", [h, "x2"], "add")
    elif build == "gather":
        h = net.op("Gather", [h, net.const("idx", [0, 1, 2, 3, 3])], "gather", axis=1)
    net.conv(h, "y", 5 if build == "pad" or build == "gather" else 4, 2)
    inputs = {**IMAGE, "x2": ["N", 4, 8, 8]} if build == "input" else IMAGE
    _, named = analyse(net.model(inputs, outputs))
    assert not named["c1"].prunable
    return "; ".join(named["c1"].refusals)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("output", "reaches graph output 'c1'"),
        ("shape", "Shape 'shape': shape-dependent consumer"),
        ("unknown", "LRN 'lrn': no channel rule for this op"),
        ("pad", "Pad 'pad': pads the channel axis"),
        ("input", "Add 'add': channels of 'x2' come from no prunable layer"),
        ("gather", "Gather 'gather': gathers along the channel axis"),
    ],
)
def test_unsafe_groups_are_refused_with_a_reason(case: str, reason: str) -> None:
    assert reason in _refusal(case)


def test_layernorm_over_channels_and_head_reshape_are_refused() -> None:
    net = Net()
    h = net.op("MatMul", ["x", net.weight("w1", (8, 8))], "fc1")
    net.op("LayerNormalization", [h, net.const("g", np.ones((5, 8)), np.float32)], "ln", axis=1)
    q = net.op("MatMul", ["x", net.weight("wq", (8, 8))], "q")
    net.op("Reshape", [q, net.const("heads_shape", [0, 0, 2, 4])], "heads")
    model = net.model({"x": ["N", 5, 8]}, ["ln", "heads"])
    _, named = analyse(model)
    ln = "LayerNormalization 'ln': normalizes over axes 1..2, not the channel axis 2 alone"
    assert ln in named["fc1"].refusals  # over the channels alone: a residual width
    # the head split is followed (analysis.channels.attention); split heads are refused
    # where they reach a graph output
    assert named["q"].refusals == ("reaches graph output 'heads'",)


def test_shape_of_other_axes_does_not_refuse_the_channels() -> None:
    """An exported batch / sequence length (Shape with start, end) reads no channel count."""
    net = Net()
    h = net.op("MatMul", ["x", net.weight("w1", (8, 6))], "fc1")
    net.op("Shape", [h], "lengths", start=0, end=2)
    net.op("Shape", [h], "width", start=-1)
    g = net.op("MatMul", ["x", net.weight("w2", (8, 6))], "fc2")
    net.op("Shape", [g], "batch", start=0, end=1)
    r = net.op("Relu", [g], "relu")
    net.op("MatMul", [r, net.weight("w3", (6, 4))], "fc3")
    _, named = analyse(net.model({"x": ["N", 5, 8]}, ["lengths", "width", "batch", "fc3"]))
    assert named["fc1"].refusals == ("Shape 'width': shape-dependent consumer",)
    assert named["fc2"].prunable
