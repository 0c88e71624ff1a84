"""Float Conv1d, ConvTranspose1d and Conv3d as conv2d: the Relax pass ``ConvAsConv2d``.

Relax's conv1d and conv3d go to the generic tiled reduction (tile_plan.py); conv2d takes the
blocked NCHWc path (blocked_layout.py: channel blocks in the vectors, any width in the
rows, weights packed at compile time). This pass runs before the blocked layout
(schedule.layout_passes) and rewrites float32 convolutions with static shapes in the default
layouts:

* **Conv1d** is the conv2d of height 1 it is: the data gains a unit axis, strides, padding
  and dilation apply to the width alone (groups as they are), the result is squeezed back
  to NCW. The generic reduction vectorizes the output's length, so a length with no divisor
  among the vector widths ran scalar: wav2vec2's feature extractor (512 -> 512 channels,
  kernel 3, stride 2) took 420 ms for the layer writing 799 samples (8.9 ms at 800), the
  model 17x onnxruntime's time; as a conv2d that layer runs in 6.1 ms, onnxruntime's 6.0,
  and the model at 0.99 of onnxruntime (docs/BENCHMARKS.md, run 24).
* **Conv3d** (groups 1) is a conv2d over its depth taps stacked as channels: the input goes
  depth-major ([N, D, C, H, W]), is padded in depth, and the kd depth slices that each
  output depth reads (stride and dilation applied) are concatenated along the channels, so
  the conv2d runs over N * D_out images of kd * C channels with the weight [O, kd * C, kh,
  kw] (reordered at compile time); its output goes back to NCDHW. The copy is kd times the
  input; the generic reduction ran r3d_18's 3x3x3 convs at 43-78 GMAC/s.

* **ConvTranspose1d** is the transposed conv2d of height 1 it is, so that a strided one
  runs as a conv2d over its output phases (transposed_phases.py) instead of TVM's form,
  which inserts stride - 1 zeros between input samples (a HiFi-GAN upsampler, kernel 16 and
  stride 8, multiplied 7 zeros for every input sample).

Quantized Conv1d and Conv3d take the same forms in the int8 lowering (int8.py; the depth
taps of a quantized Conv3d are stacked from its 8-bit integers, padded with their zero point).
Other calls (symbolic shapes, other layouts or dtypes, grouped Conv3d) are left as they are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxpress.backends.tvm.matmul_legalize import static_shape

__all__ = [
    "constant_conv_shapes",
    "conv_as_conv2d_pass",
    "depth_taps",
    "from_taps",
    "height_one_conv2d",
    "stacked_weight",
    "taps_conv2d",
]

LAYOUTS = {
    "relax.nn.conv1d": ("NCW", "OIW", "NCW"),
    "relax.nn.conv1d_transpose": ("NCW", "IOW", "NCW"),
    "relax.nn.conv3d": ("NCDHW", "OIDHW", "NCDHW"),
}


def height_one_conv2d(data: Any, weight: Any, attrs: Any) -> Any:
    """The Relax conv2d over ``data`` [N, C, 1, W] and ``weight`` [O, I / groups, 1, K] that
    computes the conv1d of ``attrs`` (strides, padding, dilation, groups: the width's)."""
    from tvm import relax

    left, right = (int(p) for p in attrs.padding)
    return relax.op.nn.conv2d(
        data,
        weight,
        strides=(1, int(attrs.strides[0])),
        padding=(0, left, 0, right),
        dilation=(1, int(attrs.dilation[0])),
        groups=int(attrs.groups),
    )


def constant_conv_shapes(call: Any, kernel_layout: str) -> list[list[int]] | None:
    """[input, weight, output] shapes of a float32 2-D convolution ``call`` (conv2d or
    conv2d_transpose) in NCHW / ``kernel_layout`` with static shapes and a constant
    weight, else None."""
    import tvm

    attrs = call.attrs
    data, weight = call.args
    found = [static_shape(x) for x in (data, weight, call)]
    shapes = [s for s in found if s is not None and len(s) == 4]
    layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
    dtypes = {str(getattr(getattr(x, "ty", None), "dtype", "")) for x in (data, weight, call)}
    if len(shapes) != 3 or not isinstance(weight, tvm.ir.Constant):
        return None
    if layouts != ("NCHW", kernel_layout, "NCHW") or dtypes != {"float32"}:
        return None
    return shapes


def _rewritable(call: Any, name: str) -> bool:
    """Whether ``call`` is a float32 ``name`` in its default layouts with static shapes of
    its rank (and, for conv3d, one group)."""
    attrs = call.attrs
    data, weight = call.args
    rank = len(LAYOUTS[name][0])
    shapes = [static_shape(x) for x in (data, weight, call)]
    layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
    dtypes = {str(getattr(getattr(x, "ty", None), "dtype", "")) for x in (data, weight, call)}
    return (
        all(shape is not None and len(shape) == rank for shape in shapes)
        and layouts == LAYOUTS[name]
        and dtypes == {"float32"}
        and (name != "relax.nn.conv3d" or int(attrs.groups) == 1)
    )


def _height_one(builder: Any, call: Any) -> tuple[Any, Any]:
    """The data and weight of a 1-D ``call`` with a unit height axis (axis 2)."""
    import tvm
    from tvm import relax

    data, weight = call.args
    data = builder.emit(relax.op.expand_dims(data, [2]))
    if isinstance(weight, tvm.ir.Constant):
        return data, relax.const(weight.value.numpy()[:, :, None, :])
    return data, builder.emit(relax.op.expand_dims(weight, [2]))


def _conv1d(builder: Any, call: Any) -> Any:
    from tvm import relax

    data, weight = _height_one(builder, call)
    conv = builder.emit(height_one_conv2d(data, weight, call.attrs))
    return relax.op.squeeze(conv, [2])


def _conv1d_transpose(builder: Any, call: Any) -> Any:
    """A transposed Conv1d as the transposed conv2d of height 1 it is (transposed_phases.py
    then runs a strided one as a conv2d over its output phases)."""
    from tvm import relax

    attrs = call.attrs
    data, weight = _height_one(builder, call)
    left, right = (int(p) for p in attrs.padding)
    conv = builder.emit(
        relax.op.nn.conv2d_transpose(
            data,
            weight,
            strides=(1, int(attrs.strides[0])),
            padding=(0, left, 0, right),
            output_padding=(0, int(attrs.output_padding[0])),
            dilation=(1, int(attrs.dilation[0])),
            groups=int(attrs.groups),
        )
    )
    return relax.op.squeeze(conv, [2])


def depth_taps(builder: Any, data: Any, call: Any, pad_value: float = 0.0) -> Any:
    """The conv2d input of Conv3d ``call`` over ``data`` (its input, or the integers of a
    quantized one, padded with ``pad_value``: their zero point): [N * D_out, kd * C, H, W],
    the kd depth slices each output depth reads, stacked along the channels."""
    from tvm import relax

    attrs = call.attrs
    n, c, _, h, w = static_shape(call.args[0])  # type: ignore[misc]
    kd = static_shape(call.args[1])[2]  # type: ignore[index]
    d_out = static_shape(call)[2]  # type: ignore[index]
    stride, dilation = int(attrs.strides[0]), int(attrs.dilation[0])
    front, back = int(attrs.padding[0]), int(attrs.padding[3])
    x = builder.emit(relax.op.permute_dims(data, [0, 2, 1, 3, 4]))  # [N, D, C, H, W]
    if front or back:
        widths = [0, 0, front, back, 0, 0, 0, 0, 0, 0]
        x = builder.emit(relax.op.nn.pad(x, widths, pad_value=pad_value))
    span = stride * (d_out - 1) + 1
    taps = [
        builder.emit(
            relax.op.strided_slice(
                x, axes=[1], begin=[k * dilation], end=[k * dilation + span], strides=[stride]
            )
        )
        for k in range(kd)
    ]
    stacked = builder.emit(relax.op.concat(taps, axis=2)) if kd > 1 else taps[0]
    return builder.emit(relax.op.reshape(stacked, [n * d_out, kd * c, h, w]))


def stacked_weight(weight: np.ndarray) -> np.ndarray:
    """A Conv3d weight [O, C, kd, kh, kw] as depth_taps' conv2d weight [O, kd * C, kh, kw]."""
    o, c, kd, kh, kw = weight.shape
    return weight.transpose(0, 2, 1, 3, 4).reshape(o, kd * c, kh, kw)


def taps_conv2d(images: Any, kernel: Any, call: Any) -> Any:
    """The conv2d over depth_taps' ``images`` with ``kernel`` (stacked_weight) that Conv3d
    ``call`` is in height and width."""
    from tvm import relax

    attrs = call.attrs
    _, top, left, _, bottom, right = (int(p) for p in attrs.padding)
    return relax.op.nn.conv2d(
        images,
        kernel,
        strides=(int(attrs.strides[1]), int(attrs.strides[2])),
        padding=(top, left, bottom, right),
        dilation=(int(attrs.dilation[1]), int(attrs.dilation[2])),
    )


def from_taps(builder: Any, conv: Any, call: Any) -> Any:
    """taps_conv2d's output [N * D_out, O, H_out, W_out] as Conv3d ``call``'s NCDHW."""
    from tvm import relax

    n, o, d_out, h_out, w_out = static_shape(call)  # type: ignore[misc]
    depth_major = builder.emit(relax.op.reshape(conv, [n, d_out, o, h_out, w_out]))
    return relax.op.permute_dims(depth_major, [0, 2, 1, 3, 4])


def _conv3d(builder: Any, call: Any) -> Any:
    import tvm
    from tvm import relax

    data, weight = call.args
    if isinstance(weight, tvm.ir.Constant):
        kernel = relax.const(stacked_weight(weight.value.numpy()))
    else:
        o, c, kd, kh, kw = static_shape(weight)  # type: ignore[misc]
        kernel = builder.emit(
            relax.op.reshape(
                builder.emit(relax.op.permute_dims(weight, [0, 2, 1, 3, 4])), [o, kd * c, kh, kw]
            )
        )
    images = depth_taps(builder, data, call)
    return from_taps(builder, builder.emit(taps_conv2d(images, kernel, call)), call)


def conv_as_conv2d_pass() -> Any:
    """The relax module pass ``ConvAsConv2d`` (see the module docstring)."""
    from tvm import relax

    from onnxpress.backends.tvm.fast_math import rewriting_pass

    rewrites = {
        "relax.nn.conv1d": _conv1d,
        "relax.nn.conv1d_transpose": _conv1d_transpose,
        "relax.nn.conv3d": _conv3d,
    }

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            name = str(getattr(call.op, "name", ""))
            if name not in rewrites or not _rewritable(call, name):
                return call
            return rewrites[name](self.builder_, call)

    return rewriting_pass("ConvAsConv2d", _Rewriter)
