"""Float Conv1d as the conv2d of height 1 it is: the Relax pass ``Conv1dAsConv2d``.

Relax's conv1d goes to the generic tiled reduction (tile_plan.py), which vectorizes the
output's length: a length with no divisor among the vector widths (799 = 17 x 47, 199)
leaves no vector axis and the kernel runs scalar. wav2vec2's feature extractor (512 -> 512
channels, kernel 3, stride 2, over 3199 -> 1599 -> 799 -> 399 -> 199 samples) took 560 ms
against onnxruntime's 33 ms, 420 ms of it in the layer that writes 799 samples (the same
layer writing 800 took 8.9 ms). As a conv2d over [N, C, 1, W] the convolution takes the
blocked NCHWc path (blocked_layout.py): channel blocks in the vectors, any width in the
rows; the 799-sample layer runs in 6.4 ms, onnxruntime's 6.1 (docs/BENCHMARKS.md, run 24).

The pass runs before the blocked layout (schedule.layout_passes). It rewrites float32
conv1d calls with static shapes in NCW / OIW layouts: the data gains a unit axis
(expand_dims), a constant weight is reshaped at compile time (another weight gets an
expand_dims), strides, padding and dilation apply to the width alone, and the result is
squeezed back to NCW. Quantized Conv1d takes the same form in the int8 lowering
(int8.py). Other conv1d calls (symbolic lengths, other layouts, other dtypes) are left
as they are.
"""

from __future__ import annotations

from typing import Any

from onnxpress.backends.tvm.matmul_legalize import static_shape

__all__ = ["conv1d_as_conv2d_pass", "height_one_conv2d"]


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


def _rewritable(call: Any) -> bool:
    """Whether ``call`` is a float32 conv1d in NCW / OIW layouts with static 3-D shapes."""
    attrs = call.attrs
    data, weight = call.args
    shapes = [static_shape(x) for x in (data, weight, call)]
    layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
    dtypes = {str(getattr(getattr(x, "ty", None), "dtype", "")) for x in (data, weight, call)}
    return (
        all(shape is not None and len(shape) == 3 for shape in shapes)
        and layouts == ("NCW", "OIW", "NCW")
        and dtypes == {"float32"}
    )


def conv1d_as_conv2d_pass() -> Any:
    """The relax module pass ``Conv1dAsConv2d`` (see the module docstring)."""
    import tvm
    from tvm import relax

    from onnxpress.backends.tvm.fast_math import rewriting_pass

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if str(getattr(call.op, "name", "")) != "relax.nn.conv1d" or not _rewritable(call):
                return call
            data, weight = call.args
            data = self.builder_.emit(relax.op.expand_dims(data, [2]))
            if isinstance(weight, tvm.ir.Constant):
                weight = relax.const(weight.value.numpy()[:, :, None, :])
            else:
                weight = self.builder_.emit(relax.op.expand_dims(weight, [2]))
            conv = self.builder_.emit(height_one_conv2d(data, weight, call.attrs))
            return relax.op.squeeze(conv, [2])

    return rewriting_pass("Conv1dAsConv2d", _Rewriter)
