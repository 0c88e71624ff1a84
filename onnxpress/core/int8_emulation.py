"""Run a QDQ model the way a target's integer kernels compute it, in numpy and onnxruntime.

``EmulatedRunner(model, arithmetic)`` has the interface of the verifier's Runner. Every
integer layer (``int8_layers``) is computed here from its 8-bit operands:

- ``exact``: int32 accumulation (VNNI ``vpdpbusd``, ARM ``sdot`` and NEON, CUDA ``dp4a``);
- ``pair-saturating``: x86 without VNNI. ``vpmaddubsw`` multiplies the raw u8 activation
  bytes by the s8 weight bytes and adds each adjacent pair along K into int16 with
  saturation; the pair sums then accumulate in int32 and the zero point is taken off with
  the exact column sums. int8 activations are shifted to u8 first (+128). u8 weights run
  on a widening kernel and depthwise convolutions on their own int32 kernel: both exact.

then ``(acc + bias) * s_x * s_w`` in float, as the kernels requantize. Exact sums run as one
float64 product per layer over zero-point-centered operands (exact below 2**53); depthwise
convolutions sum tap by tap over shifted images (float32 while every partial sum stays
below 2**24). Everything else runs on onnxruntime with graph optimizations off, i.e. the
QDQ float semantics of the other ops, one level segment at a time (``emulated_runner``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from onnxpress.core.int8_layers import IntegerLayer, reduction_matrix
from onnxpress.core.targets import PAIR_SATURATING, Arithmetic

logger = logging.getLogger(__name__)

INT16_MAX, INT16_MIN = 32767, -32768
CHUNK_ELEMENTS = 1 << 24  # pair sums held at once (float32: 64 MB)
FLOAT32_EXACT = float(1 << 24)  # every integer below it is exact in float32
Batch = dict[str, np.ndarray]


def pair_saturates(layer: IntegerLayer, arithmetic: Arithmetic) -> bool:
    """Whether this layer's products are summed in saturating int16 pairs."""
    return (
        arithmetic == PAIR_SATURATING
        and layer.weight.dtype == np.dtype(np.int8)
        and not layer.depthwise
    )


def saturating_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """sum_j sat16(x[:, 2j] w[2j] + x[:, 2j+1] w[2j+1]) for u8 x [M, K] and s8 w [K, N].

    Pairs that cannot pass the int16 limits for these activations go through one float64
    matrix product (exact below 2**53); only the others are summed pair by pair.
    """
    xf, wf = x.astype(np.float64), w.astype(np.float64)
    if xf.shape[1] % 2:
        xf, wf = np.pad(xf, ((0, 0), (0, 1))), np.pad(wf, ((0, 1), (0, 0)))
    x_max = xf.max(axis=0) if xf.size else np.zeros(xf.shape[1])
    bound = (x_max[:, None] * np.abs(wf)).reshape(-1, 2, wf.shape[1]).sum(axis=1)
    risky = np.flatnonzero((bound > INT16_MAX).any(axis=1))
    if not risky.size:
        return xf @ wf
    members = np.stack([2 * risky, 2 * risky + 1], axis=1)  # [p, 2]
    safe_w = wf.copy()
    safe_w[members.ravel()] = 0
    acc = xf @ safe_w
    x_pairs = np.ascontiguousarray(xf[:, members].transpose(1, 0, 2), dtype=np.float32)
    w_pairs = wf[members].astype(np.float32)  # [p, 2, N]
    rows = max(1, CHUNK_ELEMENTS // max(1, risky.size * wf.shape[1]))
    for start in range(0, xf.shape[0], rows):
        pair_sums = np.matmul(x_pairs[:, start : start + rows], w_pairs)  # [p, m, N]
        np.clip(pair_sums, INT16_MIN, INT16_MAX, out=pair_sums)
        acc[start : start + rows] += pair_sums.sum(axis=0, dtype=np.float64)
    return acc


def _padded(layer: IntegerLayer, x: np.ndarray, pad_value: float) -> tuple[np.ndarray, Geometry]:
    """x [B, C, *S] padded as the Conv pads it (auto_pad too), and its kernel geometry."""
    w = layer.weight.value
    assert w is not None
    kernel = tuple(int(k) for k in w.shape[2:])
    dims = len(kernel)
    attrs = layer.attributes
    strides = list(attrs.get("strides", [1] * dims))  # type: ignore[call-overload]
    dilations = list(attrs.get("dilations", [1] * dims))  # type: ignore[call-overload]
    pads = list(attrs.get("pads", [0] * (2 * dims)))  # type: ignore[call-overload]
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * dims)
        for i in range(dims):
            out = -(-x.shape[2 + i] // strides[i])
            total = max(
                0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - x.shape[2 + i]
            )
            small, big = total // 2, total - total // 2
            pads[i], pads[i + dims] = (small, big) if auto == "SAME_UPPER" else (big, small)
    widths = [(0, 0), (0, 0)] + [(pads[i], pads[i + dims]) for i in range(dims)]
    padded = np.pad(x, widths, constant_values=pad_value)
    extent = [(kernel[i] - 1) * dilations[i] + 1 for i in range(dims)]
    out_shape = tuple((padded.shape[2 + i] - extent[i]) // strides[i] + 1 for i in range(dims))
    return padded, (kernel, tuple(strides), tuple(dilations), out_shape)


Geometry = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def _columns(layer: IntegerLayer, x: np.ndarray, pad_value: float) -> tuple[np.ndarray, tuple]:
    """im2col of x [B, C, *S] -> [groups, B * prod(out), K] in (taps, channels) order."""
    padded, (kernel, strides, dilations, _) = _padded(layer, x, pad_value)
    dims = len(kernel)
    extent = [(kernel[i] - 1) * dilations[i] + 1 for i in range(dims)]
    windows = np.lib.stride_tricks.sliding_window_view(
        padded, extent, axis=tuple(range(2, 2 + dims))
    )
    index = (slice(None), slice(None), *(slice(None, None, s) for s in strides))
    index += tuple(slice(None, None, d) for d in dilations)
    windows = windows[index]  # [B, C, *out, *k]
    out_shape = windows.shape[2 : 2 + dims]
    groups = layer.groups
    batch, channels = x.shape[0], x.shape[1]
    windows = windows.reshape(batch, groups, channels // groups, *windows.shape[2:])
    # [B, g, c, *out, *k] -> [g, B, *out, *k, c]
    order = (1, 0, *range(3, 3 + dims), *range(3 + dims, 3 + 2 * dims), 2)
    cols = np.transpose(windows, order).reshape(groups, batch * int(np.prod(out_shape)), -1)
    return cols, (batch, *out_shape)


def _depthwise_sums(layer: IntegerLayer, x: np.ndarray) -> tuple[np.ndarray, tuple]:
    """Exact sums of a depthwise Conv over centered x [B, C, *S] (zero-padded): one multiply-
    add of shifted images per kernel tap, no im2col. -> ([B * prod(out), O], (B, *out))."""
    w = layer.weight.value
    assert w is not None
    centered_w = w.astype(np.float64) - layer.weight.zero_point.astype(np.float64).reshape(
        (-1,) + (1,) * (w.ndim - 1)
    )
    per_group = w.shape[0] // x.shape[1]
    if per_group > 1:  # a channel multiplier: output o reads input channel o // per_group
        x = np.repeat(x, per_group, axis=1)
    padded, (kernel, strides, dilations, out_shape) = _padded(layer, x, 0)
    taps = int(np.prod(kernel))
    bound = taps * float(np.abs(x).max(initial=0)) * float(np.abs(centered_w).max(initial=0))
    exact = np.float32 if bound < 2**24 else np.float64  # every partial sum an exact integer
    image = padded.astype(exact)
    acc = np.zeros((x.shape[0], w.shape[0], *out_shape), exact)
    channel_weights = centered_w.astype(exact).reshape(w.shape[0], taps)
    for tap, offset in enumerate(np.ndindex(*kernel)):
        spans = zip(offset, dilations, strides, out_shape, strict=True)
        window = (
            slice(None),
            slice(None),
            *(slice(o * d, o * d + (n - 1) * s + 1, s) for o, d, s, n in spans),
        )
        weight = channel_weights[:, tap].reshape((1, -1) + (1,) * len(kernel))
        acc += image[window] * weight
    rows = np.moveaxis(acc, 1, -1).reshape(-1, w.shape[0]).astype(np.float64)
    return rows, (x.shape[0], *out_shape)


def layer_output(
    layer: IntegerLayer, x_q: np.ndarray, w_q: np.ndarray | None, arithmetic: Arithmetic
) -> np.ndarray:
    """The float output of one integer layer from its 8-bit activation (and weight) values."""
    act, wt = layer.activation, layer.weight
    x = x_q.astype(np.int16)
    x_zero = int(act.zero_point)
    saturating = pair_saturates(layer, arithmetic)
    if saturating and act.dtype == np.dtype(np.int8):
        x, x_zero = x + 128, x_zero + 128  # the kernels run s8 activations as u8
    if not saturating:  # exact sums: center x, so no zero-point terms remain (pads are 0)
        x, x_zero = x - np.int16(x_zero), 0
    if layer.depthwise and not saturating:
        acc, shape = _depthwise_sums(layer, x)
        return _requantized(layer, acc, shape)
    if layer.op == "Conv":
        cols, shape = _columns(layer, x, x_zero)
        matrices = _cached(layer, "matrices", lambda: reduction_matrix(layer))
    else:
        weights = wt.value if wt.value is not None else w_q
        assert weights is not None
        if layer.op == "Gemm" and layer.attributes.get("transA", 0):
            x = np.swapaxes(x, -1, -2)
        shape = x.shape[:-1]
        cols = x.reshape(1, -1, x.shape[-1])
        if weights.ndim > 2:  # activation x activation MatMul: one matrix per batch entry
            return _batched_matmul(layer, x_q.astype(np.int64), weights, arithmetic)
        if wt.value is None:  # a runtime weight: nothing to keep
            layer.cache.clear()
        matrices = _cached(layer, "matrices", lambda: reduction_matrix(layer, weights))
    groups, n = matrices.shape[0], matrices.shape[2]
    w_zero = wt.zero_point.astype(np.int64).reshape(-1)
    zw = w_zero.reshape(groups, 1, n) if w_zero.size > 1 else w_zero.reshape(1, 1, 1)
    if not saturating:
        acc = _exact_product(layer, cols, matrices, zw)
        if wt.value is None:
            layer.cache.clear()
    else:
        outputs = []
        for group in range(groups):
            w = matrices[group].astype(np.int64)
            zg = zw[min(group, zw.shape[0] - 1), 0]
            xg = cols[group]
            outputs.append(
                saturating_matmul(xg, w)
                - x_zero * w.sum(axis=0)
                - xg.sum(axis=1, keepdims=True, dtype=np.int64) * zg
                + w.shape[0] * x_zero * zg
            )
        acc = np.concatenate(outputs, axis=1)
    return _requantized(layer, acc, shape)


def _cached(layer: IntegerLayer, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    if key not in layer.cache:
        layer.cache[key] = compute()
    return layer.cache[key]


def _exact_product(
    layer: IntegerLayer, cols: np.ndarray, matrices: np.ndarray, zw: np.ndarray
) -> np.ndarray:
    """sum_k cols[g, m, k] * (w[g, k, n] - zw) for every group, exactly: one batched float32
    product while K * max|x| * max|w - zw| (a bound on every partial sum) stays below 2**24,
    where float32 holds every integer; float64 (below 2**53) otherwise. -> [M, groups * n]."""
    centered = _cached(layer, "centered", lambda: matrices.astype(np.float64) - zw)
    largest = _cached(layer, "largest", lambda: np.abs(centered).max(initial=0.0))
    bound = cols.shape[-1] * float(np.abs(cols).max(initial=0)) * float(largest)
    if bound < FLOAT32_EXACT:
        narrow = _cached(layer, "centered32", lambda: centered.astype(np.float32))
        acc = np.matmul(cols.astype(np.float32), narrow).astype(np.float64)
    else:
        acc = np.matmul(cols.astype(np.float64), centered)
    acc = acc.transpose(1, 0, 2)
    return acc.reshape(acc.shape[0], -1)


def _requantized(layer: IntegerLayer, acc: np.ndarray, shape: tuple) -> np.ndarray:
    """(acc + bias) * s_x * s_w (+ a float bias) as float32, [B, N, *out] for a Conv."""
    act, wt = layer.activation, layer.weight
    if layer.bias_int32 is not None:
        acc = acc + layer.bias_int32.reshape(1, -1)
    scale = act.scale.astype(np.float64) * wt.scale.astype(np.float64).reshape(1, -1)
    y = acc * scale
    if layer.bias_float is not None:
        y = y + layer.bias_float.reshape(1, -1)
    if layer.op == "Gemm":
        y = y * float(layer.attributes.get("alpha", 1.0))  # type: ignore[arg-type]
    y = y.reshape(*shape, -1).astype(np.float32)
    if layer.op == "Conv":  # [B, *out, N] -> [B, N, *out]
        y = np.moveaxis(y, -1, 1)
    return y


def _batched_matmul(
    layer: IntegerLayer, x: np.ndarray, w_q: np.ndarray, arithmetic: Arithmetic
) -> np.ndarray:
    # per-tensor parameters, as scalars or one-element vectors (both are valid ONNX)
    x_zero, w_zero = (
        int(np.asarray(q.zero_point).item()) for q in (layer.activation, layer.weight)
    )
    saturating = pair_saturates(layer, arithmetic)
    if saturating and layer.activation.dtype == np.dtype(np.int8):
        x, x_zero = x + 128, x_zero + 128
    lead = np.broadcast_shapes(x.shape[:-2], w_q.shape[:-2])
    xb = np.broadcast_to(x, (*lead, *x.shape[-2:])).reshape(-1, *x.shape[-2:])
    wb = np.broadcast_to(w_q.astype(np.int64), (*lead, *w_q.shape[-2:])).reshape(
        -1, *w_q.shape[-2:]
    )
    out = np.empty((xb.shape[0], xb.shape[1], wb.shape[2]))
    for i in range(xb.shape[0]):
        raw = saturating_matmul(xb[i], wb[i]) if saturating else xb[i].astype(np.float64) @ wb[i]
        k = xb.shape[2]
        out[i] = (
            raw
            - x_zero * wb[i].sum(axis=0)
            - w_zero * xb[i].sum(axis=1, keepdims=True)
            + k * x_zero * w_zero
        )
    scale = float(np.asarray(layer.activation.scale).item()) * float(
        np.asarray(layer.weight.scale).item()
    )
    return (out * scale).reshape(*lead, xb.shape[1], wb.shape[2]).astype(np.float32)
