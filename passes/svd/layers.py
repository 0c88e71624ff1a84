"""The op forms the ``svd`` pass factors, each seen as rows x ↦ x·W_lin with W_lin [k, n].

* MatMul(x, W[k,n])          -> MatMul(MatMul(x, U[k,r]), V[r,n])
* MatMul(W[m,k], x)          -> MatMul(Vᵀ[m,r], MatMul(Uᵀ[r,k], x))       (W_lin = Wᵀ)
* Gemm(A, B, C; α, β, tA, tB) -> Gemm(Gemm(A, U; tA), V, C; 1, β)          (W_lin = α·B')
* Conv, channel scheme       -> Conv k×k with r filters per group, then Conv 1×1 (bias)
* Conv, spatial scheme       -> Conv kh×1 with r channels per group, then Conv 1×kw (bias)
* GRU input weight W[1,3H,I] -> GRU(MatMul(x, U[I,r]), W' = Vᵀ[1,3H,r])      (W_lin = W₀ᵀ)

A grouped conv is factored per group (``groups`` matrices, one rank). Calibration data is
read as rows x [row_dim] with targets y = x·linear [target_dim]: the factored matrix itself,
except for the spatial conv whose rows are whole kh×kw patches (``linear_factors`` maps its
factors there). ``match.classify`` finds the forms in a graph.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.analysis.refit import conv_patches
from onnxpress.core.ir import unique_name


class LinearForm:
    """One node applying a constant weight as a linear map on rows, per channel group."""

    kind: ClassVar[str] = ""
    groups: int = 1
    whitening_is_proxy: ClassVar[bool] = False  # the whitened SVD is not optimal on the rows

    def __init__(self, node: gs.Node, weight: gs.Constant, source: gs.Tensor) -> None:
        self.node = node
        self.weight = weight
        self.source = source  # the variable input whose rows are x
        self.values = np.asarray(weight.values)
        mats = self.matrices()
        self.k, self.n = int(mats.shape[1]), int(mats.shape[2])
        self.row_dim, self.target_dim = self.k, self.n

    def matrices(self) -> np.ndarray:
        """W_lin of each group, [groups, k, n], float64: the matrices that are factored."""
        raise NotImplementedError

    def linear_matrices(self) -> np.ndarray:
        """The map from data rows to targets, [groups, row_dim, target_dim]."""
        return self.matrices()

    def dense_values(self, matrices: np.ndarray) -> np.ndarray:
        """Inverse of ``matrices``: [groups, k, n] -> a dense weight in op layout."""
        raise NotImplementedError

    def whitening_gram(self, gram: np.ndarray) -> np.ndarray:
        """XᵀX of the data rows -> the second moment to whiten the factored matrix's rows."""
        return gram

    def linear_factors(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Factors of one group [k, r], [r, n] -> factors of its linear map (U·V = linear)."""
        return u, v

    def right_from_linear(self, v: np.ndarray, rank: int) -> np.ndarray:
        """Inverse of the second half of ``linear_factors``."""
        return v

    def key(self) -> tuple[Any, ...]:
        """Users of one weight with equal keys see the same matrices and share the factors."""
        return (self.kind,)

    def rows(self, x: np.ndarray, group: int) -> np.ndarray:
        return x.reshape(-1, self.row_dim)

    def teacher_tensor(self) -> str:
        return str(self.node.outputs[0].name)

    def targets(self, y: np.ndarray, group: int) -> np.ndarray:
        return y.reshape(-1, self.target_dim)

    def factor_values(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The two weights in op layout from U [groups, k, r] and V [groups, r, n]."""
        return u[0], v[0]

    def rewrite(self, graph: gs.Graph, first: gs.Constant, second: gs.Constant) -> gs.Node:
        """Insert the first factor's node before ``self.node``; make the node the second."""
        raise NotImplementedError

    def _insert(
        self, graph: gs.Graph, op: str, inputs: list[gs.Tensor], attrs: dict[str, Any]
    ) -> gs.Variable:
        base = self.node.name or self.node.outputs[0].name
        mid = gs.Variable(unique_name(graph, f"{base}_svd_mid"), dtype=self.values.dtype)
        name = unique_name(graph, f"{base}_svd_u")
        graph.nodes.append(gs.Node(op, name, attrs, inputs, [mid]))
        return mid


class MatMulRight(LinearForm):
    kind = "matmul"

    def matrices(self) -> np.ndarray:
        return self.values.astype(np.float64)[None]

    def dense_values(self, matrices: np.ndarray) -> np.ndarray:
        return matrices[0]

    def rewrite(self, graph: gs.Graph, first: gs.Constant, second: gs.Constant) -> gs.Node:
        mid = self._insert(graph, "MatMul", [self.source, first], {})
        self.node.inputs = [mid, second]
        return self.node


class MatMulLeft(LinearForm):
    kind = "matmul-left"

    def matrices(self) -> np.ndarray:
        return self.values.astype(np.float64).T[None]

    def dense_values(self, matrices: np.ndarray) -> np.ndarray:
        return matrices[0].T

    def rows(self, x: np.ndarray, group: int) -> np.ndarray:
        return (x if x.ndim == 1 else np.swapaxes(x, -1, -2)).reshape(-1, self.k)

    def targets(self, y: np.ndarray, group: int) -> np.ndarray:
        return (y if y.ndim == 1 else np.swapaxes(y, -1, -2)).reshape(-1, self.n)

    def factor_values(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return u[0].T, v[0].T

    def rewrite(self, graph: gs.Graph, first: gs.Constant, second: gs.Constant) -> gs.Node:
        mid = self._insert(graph, "MatMul", [first, self.source], {})
        self.node.inputs = [second, mid]
        return self.node


class GemmForm(LinearForm):
    kind = "gemm"

    def __init__(self, node: gs.Node, weight: gs.Constant, source: gs.Tensor) -> None:
        self.alpha = float(node.attrs.get("alpha", 1.0))
        self.beta = float(node.attrs.get("beta", 1.0))
        self.trans_a = int(node.attrs.get("transA", 0))
        self.trans_b = int(node.attrs.get("transB", 0))
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        self.bias = np.asarray(bias.values, np.float64) if isinstance(bias, gs.Constant) else None
        super().__init__(node, weight, source)

    def matrices(self) -> np.ndarray:
        b = self.values.astype(np.float64)
        return (self.alpha * (b.T if self.trans_b else b))[None]

    def dense_values(self, matrices: np.ndarray) -> np.ndarray:
        b = matrices[0] / (self.alpha if self.alpha else 1.0)
        return b.T if self.trans_b else b

    def key(self) -> tuple[Any, ...]:
        return (self.kind, self.alpha, self.trans_b)

    def rows(self, x: np.ndarray, group: int) -> np.ndarray:
        return x.T if self.trans_a else x

    def targets(self, y: np.ndarray, group: int) -> np.ndarray:
        if self.bias is None:
            return y
        return y - self.beta * np.broadcast_to(self.bias, y.shape)

    def rewrite(self, graph: gs.Graph, first: gs.Constant, second: gs.Constant) -> gs.Node:
        mid = self._insert(graph, "Gemm", [self.source, first], {"transA": self.trans_a})
        self.node.inputs = [mid, second, *self.node.inputs[2:]]
        self.node.attrs = {"alpha": 1.0, "beta": self.beta, "transA": 0, "transB": 0}
        return self.node


class ConvChannel(LinearForm):
    """Conv weight W [M, C/g, *kernel]: per group W_lin = W_g reshaped to [C/g·Πkernel, M/g]."""

    kind = "conv-channel"

    def __init__(self, node: gs.Node, weight: gs.Constant, source: gs.Tensor) -> None:
        values = np.asarray(weight.values)
        dims = values.ndim - 2
        attrs = node.attrs
        self.groups = int(attrs.get("group", 1))
        self.kernel = [int(d) for d in values.shape[2:]]
        self.strides = [int(d) for d in attrs.get("strides", [1] * dims)]
        self.dilations = [int(d) for d in attrs.get("dilations", [1] * dims)]
        self.pads = [int(d) for d in attrs.get("pads", [0] * 2 * dims)]
        self.auto_pad = str(attrs.get("auto_pad", "NOTSET"))
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        self.bias = np.asarray(bias.values, np.float64) if isinstance(bias, gs.Constant) else None
        super().__init__(node, weight, source)

    def _per_group(self) -> np.ndarray:
        w = self.values.astype(np.float64)
        return w.reshape(self.groups, w.shape[0] // self.groups, *w.shape[1:])

    def matrices(self) -> np.ndarray:
        w = self._per_group()
        return np.transpose(w.reshape(w.shape[0], w.shape[1], -1), (0, 2, 1))

    def dense_values(self, matrices: np.ndarray) -> np.ndarray:
        return np.transpose(matrices, (0, 2, 1)).reshape(self.values.shape)

    def key(self) -> tuple[Any, ...]:
        return (
            self.kind,
            self.groups,
            tuple(self.strides),
            tuple(self.dilations),
            tuple(self.pads),
            self.auto_pad,
        )

    def rows(self, x: np.ndarray, group: int) -> np.ndarray:
        """im2col: one row per output position, Cg·Πkernel wide, in the weight's order."""
        channels = x.shape[1] // self.groups
        x = x[:, group * channels : (group + 1) * channels]
        return conv_patches(x, self.kernel, self.strides, self.dilations, self.pads, self.auto_pad)

    def targets(self, y: np.ndarray, group: int) -> np.ndarray:
        if self.bias is not None:
            y = y - self.bias.reshape(-1, *[1] * (y.ndim - 2))
        width = self.target_dim
        y = y[:, group * width : (group + 1) * width]
        return np.moveaxis(y, 1, -1).reshape(-1, width)

    def factor_values(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        groups, _, rank = u.shape
        channels = self.values.shape[1]
        first = np.transpose(u, (0, 2, 1)).reshape(groups * rank, channels, *self.kernel)
        second = np.transpose(v, (0, 2, 1)).reshape(-1, rank, *[1] * len(self.kernel))
        return first, second

    def rewrite(self, graph: gs.Graph, first: gs.Constant, second: gs.Constant) -> gs.Node:
        dims = len(self.kernel)
        attrs = {k: v for k, v in self.node.attrs.items() if k != "kernel_shape"}
        attrs["kernel_shape"] = list(self.kernel)
        mid = self._insert(graph, "Conv", [self.source, first], attrs)
        self.node.inputs = [mid, second, *self.node.inputs[2:]]
        self.node.attrs = {
            "kernel_shape": [1] * dims,
            "strides": [1] * dims,
            "dilations": [1] * dims,
            "pads": [0] * 2 * dims,
            "group": self.groups,
        }
        return self.node


class ConvSpatial(ConvChannel):
    """2-D conv: per group W_lin[(c,i), (m,j)] = W[m,c,i,j]; a kh×1 then a 1×kw conv."""

    kind = "conv-spatial"
    whitening_is_proxy = True

    def __init__(self, node: gs.Node, weight: gs.Constant, source: gs.Tensor) -> None:
        super().__init__(node, weight, source)
        mg, cg, kh, kw = self.values.shape[0] // self.groups, *self.values.shape[1:]
        self.row_dim, self.target_dim = cg * kh * kw, mg

    def matrices(self) -> np.ndarray:
        w = self._per_group()  # [g, Mg, Cg, kh, kw]
        g, mg, cg, kh, kw = w.shape
        return np.transpose(w, (0, 2, 3, 1, 4)).reshape(g, cg * kh, mg * kw)

    def dense_values(self, matrices: np.ndarray) -> np.ndarray:
        g, cg, kh, kw = self.groups, *self.values.shape[1:]
        blocks = matrices.reshape(g, cg, kh, -1, kw)  # [g, Cg, kh, Mg, kw]
        return np.transpose(blocks, (0, 3, 1, 2, 4)).reshape(self.values.shape)

    def linear_matrices(self) -> np.ndarray:
        return ConvChannel.matrices(self)  # rows are whole patches, in (c, i, j) order

    def whitening_gram(self, gram: np.ndarray) -> np.ndarray:
        """Σ_j of the (c,i,j) x (c',i',j) blocks: the second moment of kh×1 column patches."""
        cg, kh, kw = self.values.shape[1:]
        blocks = gram.reshape(cg, kh, kw, cg, kh, kw)
        return np.einsum("abjcdj->abcd", blocks).reshape(cg * kh, cg * kh)

    def linear_factors(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """U_lin[(c,i,j), (r,j')] = U[(c,i), r]·δ(j,j'); V_lin[(r,j), m] = V[r, (m,j)]."""
        cg, kh, kw = self.values.shape[1:]
        rank = u.shape[1]
        u_lin = np.einsum("ar,jl->ajrl", u, np.eye(kw)).reshape(cg * kh * kw, rank * kw)
        v_lin = np.transpose(v.reshape(rank, -1, kw), (0, 2, 1)).reshape(rank * kw, -1)
        return u_lin, v_lin

    def right_from_linear(self, v: np.ndarray, rank: int) -> np.ndarray:
        kw = self.values.shape[3]
        return np.transpose(v.reshape(rank, kw, -1), (0, 2, 1)).reshape(rank, -1)

    def factor_values(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        groups, _, rank = u.shape
        channels, kh, kw = self.values.shape[1:]
        first = np.transpose(u, (0, 2, 1)).reshape(groups * rank, channels, kh, 1)
        mg = self.values.shape[0] // groups
        second = np.transpose(v.reshape(groups, rank, mg, kw), (0, 2, 1, 3))
        return first, second.reshape(groups * mg, rank, 1, kw)

    def rewrite(self, graph: gs.Graph, first: gs.Constant, second: gs.Constant) -> gs.Node:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        top, left, bottom, right = [0] * 4 if self.auto_pad == "VALID" else self.pads
        common = {"group": self.groups}
        mid = self._insert(
            graph,
            "Conv",
            [self.source, first],
            {
                **common,
                "kernel_shape": [kh, 1],
                "strides": [sh, 1],
                "dilations": [dh, 1],
                "pads": [top, 0, bottom, 0],
            },
        )
        self.node.inputs = [mid, second, *self.node.inputs[2:]]
        self.node.attrs = {
            **common,
            "kernel_shape": [1, kw],
            "strides": [1, sw],
            "dilations": [1, dw],
            "pads": [0, left, 0, right],
        }
        return self.node


class GruInput(LinearForm):
    """GRU input weight W [1, 3H, I]: W_lin = W₀ᵀ; the recurrence R stays inside the op."""

    kind = "gru-w"

    def matrices(self) -> np.ndarray:
        return self.values.astype(np.float64)[0].T[None]

    def dense_values(self, matrices: np.ndarray) -> np.ndarray:
        return matrices[0].T[None]

    def teacher_tensor(self) -> str:
        return str(self.source.name)  # targets are the teacher's x·W₀ᵀ

    def targets(self, y: np.ndarray, group: int) -> np.ndarray:
        return y.reshape(-1, self.k).astype(np.float64) @ self.matrices()[0]

    def factor_values(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return u[0], v[0].T[None]

    def rewrite(self, graph: gs.Graph, first: gs.Constant, second: gs.Constant) -> gs.Node:
        mid = self._insert(graph, "MatMul", [self.source, first], {})
        self.node.inputs[0] = mid
        self.node.inputs[1] = second
        return self.node
