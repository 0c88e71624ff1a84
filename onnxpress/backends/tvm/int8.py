"""QDQ to integer compute on TVM: Relax computes an imported QDQ model in float; this rewrite
makes its convolutions and matmuls integer.

  conv2d(dequantize(xq, sx, zx), dequantize(Wq, sw[oc], 0))            (float, fake quant)
      -> float(conv2d_int32(pad(xq, zx), Wq) - zx * sum(Wq[oc])) * (sx * sw[oc])
  matmul(dequantize(aq, sa, za), dequantize(Wq, sw[n], 0) [permute_dims])
      -> float(matmul_int32(aq, Wq) - za * sum_k Wq[k, n]) * (sa * sw[n])
  matmul of two dequantized activations (attention scores) stays float: without a packed
      integer kernel for a runtime right-hand side it is faster that way
  quantize(max_pool2d(dequantize(q, s, z)), s, z) -> max_pool2d(q)
  quantize(sigmoid(dequantize(q))) and other one-tensor functions -> a 256-entry table
      (int8_unary.py)

The integer accumulation is exact; the float epilogue (bias, activation, the next quantize)
is what onnxruntime's QLinear kernels do too, so results match onnxruntime's QDQ run within
one quantization step. Padding uses the zero point (the integer image of float 0).
Where the target has a dot-product instruction (int8_kernels.kernels: x86 AVX512-VNNI
vpdpbusd, u8 x s8; aarch64 +dotprod sdot, s8 x s8; x86 AVX2) the products run in a packed
kernel (convolutions through im2col; activations shifted by 128 to the operand's
signedness); elsewhere in Relax's own integer conv2d/matmul. AVX2's fast u8 x s8 kernel
(vpmaddubsw) sums product pairs in int16 with saturation: a layer runs on it only when its
weights, in that kernel's K order, cannot saturate for any activation byte; the others run on
an exact int16 kernel (vpmaddwd). There, 3x3 stride-1 convs of 16+ channels run as exact
integer Winograd on that int16 kernel (int8_winograd.py): F(4x4, 3x3) for outputs of 12 x 12
and more where the weights' sums keep it exact (4x fewer products), else F(2x2, 3x3) (2.25x).
With VNNI, F(4x4) runs its int16 GEMM on vpdpwssd (half vpdpbusd's products a step, so F(2x2)
would not pay there).
Depthwise and grouped convs, which have no dot product for those kernels, sum their products
exactly in float registers (int8_depthwise.py). Each layer's kernel is
recorded in the result. Patterns that do not fit (per-channel activation scales, weights
with a zero point, non-NCHW layouts) stay in float, with the reason counted in the result.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from onnxpress.backends.tvm import int8_depthwise, int8_winograd
from onnxpress.backends.tvm.conv_as_conv2d import (
    depth_taps,
    from_taps,
    height_one_conv2d,
    stacked_weight,
    taps_conv2d,
)
from onnxpress.backends.tvm.int8_gemm import as_operand, conv_gemm, gemm
from onnxpress.backends.tvm.int8_kernels import (
    GROUP,
    DotIsa,
    KernelChoice,
    choose,
    round_up,
    winograd_isa,
)
from onnxpress.backends.tvm.int8_kernels import kernels as target_kernels
from onnxpress.backends.tvm.int8_patterns import (
    Dequantized,
    Int8Lowering,
    Refused,
    Window,
    constant_value,
    op_name,
    signed_weight,
)
from onnxpress.backends.tvm.int8_unary import (
    Rewriting,
    pooled_integers,
    reciprocal_scale,
    table_lookup,
)
from onnxpress.backends.tvm.layout_sink import sink_layout_changes
from onnxpress.backends.tvm.matmul_legalize import static_shape
from onnxpress.backends.tvm.tile_schedule import vector_lanes

logger = logging.getLogger(__name__)


def _require_layouts(attrs: Any, data: str, kernel: str) -> None:
    """Refuse a convolution whose data/kernel/output layouts are not data/kernel/data."""
    if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != (
        data,
        kernel,
        data,
    ):
        raise Refused(f"layout is not {data}/{kernel}")


def lower_qdq_to_integer(mod: Any, target: Any) -> tuple[Any, Int8Lowering]:
    """Rewrite every fitting quantized conv2d/matmul of ``mod['main']``; returns the new module
    (dead float dequantizes removed) and what was done."""
    from tvm import relax

    choice: KernelChoice | None = target_kernels(target)
    isa: DotIsa | None = choice.exact if choice is not None else None
    # exact int16 Winograd for 3x3 convs: AVX2's exact kernel, or VNNI's vpdpwssd
    winograd = winograd_isa(isa)
    lanes = vector_lanes(target)  # float lanes: int8_depthwise's channel blocks
    result = Int8Lowering(
        "relax" if choice is None else "avx2" if choice.saturation_safe else choice.exact.name
    )

    @relax.expr_functor.mutator
    class Lowering(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = self.visit_expr_post_order(call)
            name = op_name(call)
            try:
                rule = {
                    "relax.nn.conv2d": self._conv2d,
                    "relax.nn.conv1d": self._conv1d,
                    "relax.nn.conv3d": self._conv3d,
                    "relax.matmul": self._matmul,
                    "relax.quantize": self._quantize,
                }.get(name)
                new = rule(call) if rule is not None else None
                if new is not None:
                    return new
            except Refused as refused:
                result.kept_float[f"{name.removeprefix('relax.')}: {refused}"] += 1
            return call

        def _producer(self, expr: Any) -> Any:
            if isinstance(expr, relax.Var):
                bound = self.lookup_binding(expr)
                return bound if bound is not None else expr
            return expr

        def _dequantized(self, expr: Any) -> Dequantized | None:
            value = self._producer(expr)
            permutation: list[int] | None = None
            if op_name(value) == "relax.permute_dims":
                axes = value.attrs.axes
                permutation = [int(a) for a in axes] if axes is not None else None
                value = self._producer(value.args[0])
                if permutation is None:
                    permutation = list(range(len(value.ty.shape)))[::-1]
            if op_name(value) != "relax.dequantize":
                return None
            data, scale, zero_point = value.args
            scale_np, zero_np = constant_value(scale), constant_value(zero_point)
            if scale_np is None or zero_np is None:
                raise Refused("non-constant scale or zero point")
            constant = constant_value(self._producer(data))
            axis = int(value.attrs.axis)
            rank = len(data.ty.shape)
            axis = axis % rank if rank else 0
            if permutation is not None:
                if constant is None:
                    return None  # a transposed activation: leave it
                constant = np.transpose(constant, permutation)
                axis = permutation.index(axis)
            return Dequantized(data, str(data.ty.dtype), scale_np, zero_np, axis, constant)

        def _activation(self, expr: Any) -> Dequantized:
            dq = self._dequantized(expr)
            if dq is None:
                raise Refused("input is not dequantized")
            if not dq.per_tensor:
                raise Refused("per-channel activation scale")
            if dq.dtype not in ("uint8", "int8"):
                raise Refused(f"{dq.dtype} activation")
            return dq

        def _weight(self, expr: Any, out_axis: int) -> Dequantized:
            dq = self._dequantized(expr)
            if dq is None or dq.constant is None:
                raise Refused("weight is not a dequantized constant")
            dq = signed_weight(dq)
            if dq.dtype != "int8":
                raise Refused(f"{dq.dtype} weight")
            if np.any(dq.zero_point != 0):
                raise Refused("weight zero point is not 0")
            if dq.scale.size > 1 and dq.axis != out_axis:
                raise Refused("weight scale is not per output channel")
            return dq

        def _kernel(self, op: str, shape: tuple[int, ...], weight_kn: np.ndarray) -> DotIsa:
            """The kernel for a layer whose weights in the kernel's K order are weight_kn."""
            assert choice is not None
            chosen, risky = choose(choice, weight_kn)
            result.record(op, shape, chosen.name, risky)
            return chosen

        def _epilogue(self, acc: Any, correction: np.ndarray, scale: np.ndarray) -> Any:
            if np.any(correction != 0):
                acc = self.builder_.emit(
                    relax.op.subtract(acc, relax.const(correction.astype(np.int32)))
                )
            as_float = self.builder_.emit(relax.op.astype(acc, "float32"))
            return relax.op.multiply(as_float, relax.const(scale.astype(np.float32)))

        def _matmul(self, call: Any) -> Any:
            a_expr, b_expr = call.args
            b_dq = self._dequantized(b_expr)
            if b_dq is None or self._dequantized(a_expr) is None:
                return None
            if b_dq.constant is None:
                # Both operands are activations (attention scores): an int16 Relax matmul is
                # several times slower than the float one here, so Relax's float (dequantized)
                # form stays; its error against an integer run is far below one step.
                raise Refused("two activations (kept in float: faster)")
            if b_dq.constant.ndim != 2:
                raise Refused("weight is not 2-D")
            act = self._activation(a_expr)
            weight = self._weight(b_expr, out_axis=1)
            assert weight.constant is not None
            w_kn = weight.constant.astype(np.int8)
            depth, cols = w_kn.shape
            shape = [int(d) for d in act.data.ty.shape]
            zero = int(act.zero_point.reshape(-1)[0])
            if isa is not None:
                padded_kn = np.zeros((round_up(depth, GROUP), cols), np.int8)
                padded_kn[:depth] = w_kn
                kernel = self._kernel("matmul", w_kn.shape, padded_kn)
                data, zero = as_operand(self.builder_, act, kernel.a_dtype)
                rows = int(np.prod(shape[:-1]))
                flat = self.builder_.emit(relax.op.reshape(data, [rows, depth]))
                acc = gemm(self.builder_, flat, rows, depth, w_kn, kernel)
                acc = self.builder_.emit(relax.op.reshape(acc, [*shape[:-1], cols]))
            else:
                result.record("matmul", w_kn.shape, "relax")
                acc = self.builder_.emit(
                    relax.op.matmul(act.data, relax.const(w_kn), out_dtype="int32")
                )
            correction = zero * w_kn.astype(np.int64).sum(axis=0)
            scale = act.scale.reshape(-1)[0] * np.broadcast_to(weight.scale.reshape(-1), (cols,))
            result.lowered["matmul"] += 1
            return self._epilogue(acc, correction, scale)

        def _conv2d(self, call: Any) -> Any:
            attrs = call.attrs
            if self._dequantized(call.args[0]) is None:
                return None
            _require_layouts(attrs, "NCHW", "OIHW")
            act = self._activation(call.args[0])
            weight = self._weight(call.args[1], out_axis=0)
            assert weight.constant is not None
            w = weight.constant.astype(np.int8)
            out_channels = w.shape[0]
            padding = tuple(int(p) for p in attrs.padding)
            strides = (int(attrs.strides[0]), int(attrs.strides[1]))
            dilation = (int(attrs.dilation[0]), int(attrs.dilation[1]))
            groups = int(attrs.groups)
            out_shape = [int(d) for d in call.ty.shape]
            transform = None
            if winograd is not None and groups == 1:
                out_hw = (out_shape[2], out_shape[3])
                transform = int8_winograd.choose(
                    w, strides, dilation, out_hw, out_shape[0], f2=winograd.form == "madd16"
                )
            if winograd is not None and transform is not None:
                suffix = "" if transform.m == 2 else f"-f{transform.m}"
                result.record("conv2d", w.shape, f"{winograd.name}-winograd{suffix}")
                acc = int8_winograd.emit(self.builder_, act.data, int(act.zero_point.reshape(-1)[0]), w, padding, out_shape, winograd, transform)  # fmt: skip
                zero = 0  # subtracted before the transform
            elif isa is not None and groups == 1:
                acc, zero = conv_gemm(
                    self.builder_,
                    act,
                    w,
                    Window(padding, strides, dilation),
                    out_shape,
                    lambda kn: self._kernel("conv2d", w.shape, kn),
                )
            elif (
                isa is not None
                and groups == out_channels
                and w.shape[1] == 1
                and int8_depthwise.fits(w)
            ):
                acc, zero = self._depthwise_nhwc(act, w, Window(padding, strides, dilation))
            elif groups > 1 and int8_depthwise.fits(w):
                zero = int(act.zero_point.reshape(-1)[0])
                result.record("conv2d", w.shape, "float-exact-grouped")
                window = Window(padding, strides, dilation)
                acc = int8_depthwise.emit_grouped(self.builder_, act.data, zero, w, window, groups)
            else:
                result.record("conv2d", w.shape, "relax")
                zero = int(act.zero_point.reshape(-1)[0])
                top, left, bottom, right = padding
                padded = act.data
                if any(padding):
                    padded = self.builder_.emit(
                        relax.op.nn.pad(
                            act.data, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(zero)
                        )
                    )
                acc = self.builder_.emit(
                    relax.op.nn.conv2d(
                        padded,
                        relax.const(w),
                        strides=strides,
                        padding=(0, 0),
                        dilation=dilation,
                        groups=groups,
                        out_dtype="int32",
                    )
                )
            shape = (1, out_channels, 1, 1)
            correction = (zero * w.astype(np.int64).sum(axis=(1, 2, 3))).reshape(shape)
            scale = act.scale.reshape(-1)[0] * np.broadcast_to(
                weight.scale.reshape(-1), (out_channels,)
            )
            result.lowered["conv2d" if groups == 1 else "conv2d (grouped)"] += 1
            return self._epilogue(acc, correction, scale.reshape(shape))

        def _conv1d(self, call: Any) -> Any:
            """A quantized Conv1d as the conv2d of height 1 it is (integer kernels, exact
            sums; Relax's float form can land a level off the exact result, and a finer scale
            downstream doubles it: wav2vec2, Whisper), squeezed back to NCW."""
            attrs = call.attrs
            act = self._dequantized(call.args[0])
            if act is None:
                return None
            _require_layouts(attrs, "NCW", "OIW")
            weight = self._dequantized(call.args[1])
            if weight is None or weight.constant is None:
                raise Refused("weight is not a dequantized constant")

            data = self.builder_.emit(relax.op.expand_dims(act.data, [2]))
            x = self._dequantize(data, act, act.axis + 1 if act.axis >= 2 else act.axis)
            w = self._dequantize(relax.const(weight.constant[:, :, None, :]), weight, weight.axis)
            conv = self.builder_.normalize(height_one_conv2d(x, w, attrs))
            lowered = self._conv2d(conv)
            if lowered is None:
                return None
            return relax.op.squeeze(self.builder_.emit(lowered), [2])

        def _conv3d(self, call: Any) -> Any:
            """A quantized Conv3d as the conv2d over its depth taps stacked as channels
            (conv_as_conv2d.py), the taps taken from its 8-bit integers (padded with their
            zero point), lowered as any conv2d, back to NCDHW."""
            act = self._dequantized(call.args[0])
            if act is None:
                return None
            _require_layouts(call.attrs, "NCDHW", "OIDHW")
            weight = self._dequantized(call.args[1])
            if weight is None or weight.constant is None:
                raise Refused("weight is not a dequantized constant")
            if weight.scale.size != 1 and weight.axis != 0:
                raise Refused("weight scales along another axis than the output channels")
            if int(call.attrs.groups) != 1 or not act.per_tensor:
                raise Refused("grouped, or a per-channel activation")
            if static_shape(call) is None or static_shape(call.args[0]) is None:
                raise Refused("symbolic shape")
            zero = float(act.zero_point.reshape(-1)[0])
            x = self._dequantize(depth_taps(self.builder_, act.data, call, zero), act, 1)
            w = self._dequantize(relax.const(stacked_weight(weight.constant)), weight, 0)
            lowered = self._conv2d(self.builder_.normalize(taps_conv2d(x, w, call)))
            if lowered is None:
                return None
            return from_taps(self.builder_, self.builder_.emit(lowered), call)

        def _dequantize(self, data: Any, dq: Dequantized, axis: int) -> Any:
            scale = relax.const(dq.scale.astype(np.float32))
            zero = relax.const(dq.zero_point.astype(dq.dtype))
            return self.builder_.emit(relax.op.dequantize(data, scale, zero, axis=axis))

        def _depthwise_nhwc(
            self, act: Dequantized, w: np.ndarray, window: Window
        ) -> tuple[Any, int]:
            """Depthwise int32 conv (exact float sums in the blocked layout,
            int8_depthwise.py) of NHWC activations (channels contiguous, like the GEMM
            path's, so the transposes around it fuse away); NCHW int32 out."""
            data = self.builder_.emit(relax.op.permute_dims(act.data, [0, 2, 3, 1]))
            zero = int(act.zero_point.reshape(-1)[0])
            result.record("conv2d", w.shape, "float-exact-depthwise")
            return int8_depthwise.emit(self.builder_, data, zero, w, window, lanes), zero

        def _quantize(self, call: Any) -> Any:
            at = Rewriting(self.builder_, self._producer, self._dequantized, result)
            for rewrite in (pooled_integers, table_lookup, reciprocal_scale):
                new = rewrite(call, at)
                if new is not None:
                    return new
            return None

        def run(self) -> Any:
            for gvar, func in list(self.builder_.get().functions.items()):
                if isinstance(func, relax.Function):
                    self.builder_.update_func(gvar, self.visit_expr(func))
            return self.builder_.get()

    lowered = Lowering(mod).run()
    lowered = sink_layout_changes(relax.transform.DeadCodeElimination()(lowered))
    logger.info("int8 lowering (%s): %s", result.kernel, dict(result.lowered))
    return lowered, result
