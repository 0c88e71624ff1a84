"""Convolutions legalized for the register tile: weights packed at compile time into the
blocks it reads, 1x1 convolutions over the flattened image, kernel-sized transposed ones.

``ConvKernelLayout`` (``conv_kernel_layout_pass``) gives regular convolutions IHWO weights, so a vector
of output channels is one load. But the tile of ``TiledReduction`` walks the reduction
(input channel, kernel row, kernel column) for one block of S x W output channels: in IHWO
consecutive steps are O floats apart (2 KB for 512 channels), every step touches new cache
lines and whole-layer weights stream from L3 once per output row. A 3x3 conv of 512
channels at 7x7 ran at 57% of the speed of the same kernel with 32 output channels, whose
weights are read in order (133 vs 237 GFLOP/s, one core, AVX-512).

``legalize_conv2d`` replaces TVM's legalization of those IHWO convolutions (groups 1,
float, NCHW) with two TE kernels:

    packed[o // B, i, kh, kw, o % B] = w[i, kh, kw, o]        (B = S x W of the tile plan)
    out[n, o, y, x] = sum_{i, kh, kw} pad(x)[n, i, y*s + kh*d, x*s + kw*d]
                                      * packed[o // B, i, kh, kw, o % B]

FoldConstant runs the packing once at compile time when the weights are constants (they are
in ``onnxpress compile``), so the tile's weight reads are sequential: B floats a step. B
comes from ``stacked_rows``, the choice ``plan_tile`` makes for the kernel, so the tile and
the packing agree. The sum runs in the same order as TOPI's conv2d, so results match it.
1x1 convolutions of stride 1 without padding on an image of whole vectors (H*W a multiple
of the lanes) are a GEMM over the flattened image instead: ``flat[n, o, p] = sum_i x[n, i, p]
* w[i, o]`` read back as ``out[n, o, p // W, p % W]``. The tile then vectorizes p, whose
lanes run on across image rows (contiguous in memory: ``lane_strides`` checks the row-major
offset), broadcasts weights of a few output channels and writes whole vectors: a 24 -> 144
channel conv at 56x56 went from 150 to 300 GFLOP/s (two cores, AVX-512), where the
channel-vector tile was bound by its scattered write-back.
Convolutions this does not cover keep TVM's legalization.
"""

from __future__ import annotations

import logging
from typing import Any

from onnxpress.backends.tvm.matmul_legalize import legalize_matmul, static_shape
from onnxpress.backends.tvm.tile_plan import stacked_rows, vector_width

logger = logging.getLogger(__name__)


def conv_kernel_layout_pass(lanes: int) -> Any:
    """The relax pass ``ConvKernelLayout`` (see the module docstring)."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not _wants_ihwo(call, lanes):
                return call
            attrs = call.attrs
            return relax.op.nn.conv2d(
                call.args[0],
                relax.op.permute_dims(call.args[1], [1, 2, 3, 0]),
                strides=attrs.strides,
                padding=attrs.padding,
                dilation=attrs.dilation,
                groups=attrs.groups,
                data_layout="NCHW",
                kernel_layout="IHWO",
                out_layout="NCHW",
                out_dtype=attrs.out_dtype,
            )

    @tvm.transform.module_pass(opt_level=0, name="ConvKernelLayout")
    def _pass(mod: Any, _ctx: Any) -> Any:
        rewriter = _Rewriter(mod)
        for gvar, func in mod.functions.items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
        return rewriter.builder_.get()

    return _pass


def _wants_ihwo(call: Any, lanes: int) -> bool:
    if getattr(call.op, "name", "") != "relax.nn.conv2d":
        return False
    attrs = call.attrs
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
        return False
    weight = call.args[1].ty
    shape = getattr(weight, "shape", None)
    if shape is None or len(shape) != 4 or not str(weight.dtype).startswith("float"):
        return False
    try:
        per_group = int(shape[0]) // int(attrs.groups)
    except TypeError:  # symbolic channel count
        return False
    return any(per_group % width == 0 for width in (lanes, lanes // 2, lanes // 4) if width >= 4)


def packed_block(
    batch: int, channels: int, height: int, width: int, lanes: int, registers: int
) -> int:
    """Output channels per packed block (S x W of the tile plan for an NCHW output of this
    shape), or 0 when no vector of channels fits."""
    lane_count = vector_width(channels, lanes)
    if not lane_count:
        return 0
    extents = (batch, channels, height, width)
    rows = [axis for axis in (3, 2, 0) if extents[axis] > 1]
    stack, _, _ = stacked_rows(extents, 1, lane_count, rows, registers)
    return stack * lane_count


def _ints(values: Any) -> list[int]:
    return [int(v) for v in values]


def _pointwise(attrs: Any, weight: list[int], data: list[int], out: list[int]) -> bool:
    """A 1x1 convolution of stride 1 without padding: a GEMM over the flattened image."""
    return (
        weight[1:3] == [1, 1]
        and _ints(attrs.strides) == [1, 1]
        and not any(_ints(attrs.padding))
        and data[2:] == out[2:]
    )


def _flat_pointwise(x: Any, w: Any) -> Any:
    """out[n, o, y, x] = flat[n, o, y * W + x], flat[n, o, p] = sum_i x[n, i, p] * w[i, o]:
    the tile vectorizes p, whose lanes run on across image rows (contiguous in memory),
    and broadcasts weights of one row of output channels each."""
    from tvm import te

    n, channels, height, width = x.shape
    outputs = w.shape[3]
    rc = te.reduce_axis((0, channels), name="rc")
    flat = te.compute(
        (n, outputs, height * width),
        lambda nn, ff, p: te.sum(x[nn, rc, p // width, p % width] * w[rc, 0, 0, ff], axis=rc),
        name="conv2d_nchw",
        tag="conv2d_nchw",
    )
    return te.compute(
        (n, outputs, height, width),
        lambda nn, ff, yy, xx: flat[nn, ff, yy * width + xx],
        name="conv2d_unflat",
    )


def legalize_conv2d(lanes: int, registers: int) -> Any:
    """The legalization of ``relax.nn.conv2d`` for the CPU pipeline: packed weights for
    IHWO convolutions (see the module docstring), TVM's own for every other."""
    import tvm
    from tvm import te, topi

    default = tvm.ir.Op.get("relax.nn.conv2d").get_attr("FLegalize")

    def legalize(bb: Any, call: Any) -> Any:
        attrs = call.attrs
        data, weight = static_shape(call.args[0]), static_shape(call.args[1])
        out = static_shape(call)
        if (
            data is None
            or weight is None
            or out is None
            or (attrs.data_layout, attrs.kernel_layout, attrs.out_layout)
            != ("NCHW", "IHWO", "NCHW")
            or int(attrs.groups) != 1
            or str(call.ty.dtype) != "float32"
            or str(call.args[0].ty.dtype) != "float32"
        ):
            return default(bb, call)
        if _pointwise(attrs, weight, data, out) and (out[2] * out[3]) % lanes == 0:
            return bb.call_te(
                _flat_pointwise, call.args[0], call.args[1], primfunc_name_hint="conv2d"
            )
        block = packed_block(out[0], out[1], out[2], out[3], lanes, registers)
        if not block or out[1] % block:
            return default(bb, call)
        strides, dilation = _ints(attrs.strides), _ints(attrs.dilation)
        top, left, bottom, right = _ints(attrs.padding)

        def pack(w: Any) -> Any:
            i, kh, kw, o = w.shape
            return te.compute(
                (o // block, i, kh, kw, block),
                lambda ob, c, y, x, ol: w[c, y, x, ob * block + ol],
                name="packed_weight",
            )

        def conv(x: Any, packed: Any) -> Any:
            n, _, _, _ = x.shape
            _, i, kh, kw, _ = packed.shape
            padded = x
            if top or left or bottom or right:
                padded = topi.nn.pad(x, [0, 0, top, left], [0, 0, bottom, right], name="pad_temp")
            rc = te.reduce_axis((0, i), name="rc")
            ry = te.reduce_axis((0, kh), name="ry")
            rx = te.reduce_axis((0, kw), name="rx")
            return te.compute(
                (n, out[1], out[2], out[3]),
                lambda nn, ff, yy, xx: te.sum(
                    padded[
                        nn,
                        rc,
                        yy * strides[0] + ry * dilation[0],
                        xx * strides[1] + rx * dilation[1],
                    ]
                    * packed[ff // block, rc, ry, rx, ff % block],
                    axis=[rc, ry, rx],
                ),
                name="conv2d_nchw",
                tag="conv2d_nchw",
            )

        packed = bb.emit_te(pack, call.args[1], primfunc_name_hint="pack_conv_weight")
        return bb.call_te(conv, call.args[0], packed, primfunc_name_hint="conv2d")

    return legalize


def legalize_conv2d_transpose() -> Any:
    """The legalization of ``relax.nn.conv2d_transpose`` for the CPU pipeline: a transposed
    convolution whose kernel equals its stride (U-Net upsampling, 2x2 stride 2) touches
    each output pixel once, so it is a 1x1 convolution per kernel position,

        out[n, o, y, x] = sum_c x[n, c, y // KH, x // KW] * w[c, o, y % KH, x % KW]

    with the weights packed once as [KH, KW, C, O] (a vector of output channels is one
    load). TOPI's form dilates the input with zeros and runs a full convolution over it:
    three quarters of its multiply-adds were by zero (62 GFLOP/s effective). Other
    transposed convolutions keep TVM's legalization."""
    import tvm
    from tvm import te

    default = tvm.ir.Op.get("relax.nn.conv2d_transpose").get_attr("FLegalize")

    def legalize(bb: Any, call: Any) -> Any:
        attrs = call.attrs
        data, weight = static_shape(call.args[0]), static_shape(call.args[1])
        if (
            data is None
            or weight is None
            or (attrs.data_layout, attrs.kernel_layout, attrs.out_layout)
            != ("NCHW", "IOHW", "NCHW")
            or int(attrs.groups) != 1
            or _ints(attrs.strides) != weight[2:]
            or any(_ints(attrs.padding))
            or any(_ints(attrs.output_padding))
            or _ints(attrs.dilation) != [1, 1]
            or str(call.ty.dtype) != "float32"
        ):
            return default(bb, call)
        kh, kw = weight[2:]

        def pack(w: Any) -> Any:
            channels, outputs, _, _ = w.shape
            return te.compute(
                (kh, kw, channels, outputs),
                lambda i, j, c, o: w[c, o, i, j],
                name="packed_weight",
            )

        def upsample(x: Any, packed: Any) -> Any:
            # over [n, o, y // KH, y % KH, x // KW, x % KW]: the weights then depend on the
            # kernel position only, and the tile's rows (input columns) reuse each vector
            n, channels, height, width = x.shape
            outputs = packed.shape[3]
            rc = te.reduce_axis((0, channels), name="rc")
            blocks = te.compute(
                (n, outputs, height, kh, width, kw),
                lambda nn, ff, h, i, w, j: te.sum(x[nn, rc, h, w] * packed[i, j, rc, ff], axis=rc),
                name="conv2d_transpose_nchw",
            )
            return te.compute(
                (n, outputs, height * kh, width * kw),
                lambda nn, ff, yy, xx: blocks[nn, ff, yy // kh, yy % kh, xx // kw, xx % kw],
                name="conv2d_transpose_unblock",
            )

        packed = bb.emit_te(pack, call.args[1], primfunc_name_hint="pack_deconv_weight")
        return bb.call_te(upsample, call.args[0], packed, primfunc_name_hint="conv2d_transpose")

    return legalize


def legalize_passes(lanes: int, registers: int) -> list[Any]:
    """cpu_generic's legalization passes with ``legalize_conv2d`` for conv2d,
    ``legalize_conv2d_transpose`` for conv2d_transpose and ``legalize_matmul`` for
    matmul."""
    import tvm

    transform = tvm.relax.transform
    custom = {
        "relax.nn.conv2d": legalize_conv2d(lanes, registers),
        "relax.nn.conv2d_transpose": legalize_conv2d_transpose(),
        "relax.matmul": legalize_matmul(lanes, registers),
    }
    return [
        transform.LegalizeOps(custom),
        transform.AnnotateTIROpPattern(),
        transform.FoldConstant(),
        transform.FuseOps(),
        transform.FuseTIR(),
    ]
