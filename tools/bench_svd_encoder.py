"""SVD on a 90 MB BERT-style sentence encoder: time, peak memory, chosen ranks and quality.

``build`` writes, to a folder (nothing is committed), an encoder shaped like all-MiniLM-L6
(post-LayerNorm BERT: word/position/token-type embeddings of a 30522-token vocabulary, 6
layers, hidden 384, 12 heads, feed-forward 1536 with the erf GELU, attention mask,
mean pooling over the mask and L2 normalization: 22.7 M params, ~91 MB) in the form
torch's legacy exporter gives (MatMul + Add + Reshape + Transpose), with random weights
whose singular values decay like a trained model's (s_i ∝ (i+1)^-0.6; plain Gaussian
weights have a flat spectrum, on which no rank rule has anything to choose), and its
calibration data: a folder of .npz batches of token ids drawn from a Zipf law (as words in
text are) with CLS/SEP, padded to 128 tokens. ``measure`` runs

    onnxpress optimize enc.onnx --passes 'svd{budget=B}' --calibration calib -o out.onnx

in a child process and reads its wall time, CPU time (user + system) and peak RSS from
``wait4``; then scores the result on held-out sentences against the original: embedding
rel-L2, mean cosine, and the Spearman correlation of all pairwise similarities (the way a
sentence-similarity benchmark ranks pairs), and lists the factored weights and ranks.

    python tools/bench_svd_encoder.py --dir /tmp/enc                 # build + budget 0.75
    python tools/bench_svd_encoder.py --dir /tmp/enc --budget 0.5 --budget 0.75 --json r.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

VOCAB, POSITIONS, LAYERS, HIDDEN, HEADS, FFN, SEQ = 30522, 512, 6, 384, 12, 1536, 128
CALIBRATION_BATCHES, BATCH, EVAL_SEQUENCES = 16, 16, 128
CLS, SEP, PAD = 101, 102, 0
SPECTRUM_DECAY = 0.6


class EncoderBuilder:
    """Nodes and initializers of the encoder graph, named like torch's legacy export."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def matrix(self, name: str, k: int, n: int, norm: float) -> str:
        """A [k, n] weight with decaying singular values and columns of RMS norm ``norm``."""
        rank = min(k, n)
        left, _ = np.linalg.qr(self.rng.standard_normal((k, rank)))
        right, _ = np.linalg.qr(self.rng.standard_normal((n, rank)))
        singular = (np.arange(rank) + 1.0) ** -SPECTRUM_DECAY
        singular *= norm * np.sqrt(n / np.sum(singular**2))
        return self.const(name, ((left * singular) @ right.T).astype(np.float32))

    def vector(self, name: str, size: int, mean: float, std: float) -> str:
        values = mean + std * self.rng.standard_normal(size)
        return self.const(name, values.astype(np.float32))

    def op(self, kind: str, inputs: list[str], name: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(kind, inputs, [name], name=name, **attrs))
        return name

    def linear(self, x: str, name: str, k: int, n: int, norm: float) -> str:
        h = self.op("MatMul", [x, self.matrix(f"{name}.weight", k, n, norm)], f"{name}/MatMul")
        return self.op("Add", [self.vector(f"{name}.bias", n, 0.0, 0.02), h], f"{name}/Add")

    def layer_norm(self, x: str, name: str) -> str:
        scale = self.vector(f"{name}.weight", HIDDEN, 1.0, 0.05)
        bias = self.vector(f"{name}.bias", HIDDEN, 0.0, 0.02)
        return self.op("LayerNormalization", [x, scale, bias], name, axis=-1, epsilon=1e-12)

    def gelu(self, x: str, name: str) -> str:
        scaled = self.op("Div", [x, "sqrt2"], f"{name}/Div")
        erf = self.op("Add", [self.op("Erf", [scaled], f"{name}/Erf"), "one"], f"{name}/Add")
        return self.op("Mul", [self.op("Mul", [x, erf], f"{name}/Mul"), "half"], f"{name}/Mul_1")

    def attention(self, x: str, mask: str, p: str) -> str:
        heads = []
        for part, perm in (("query", [0, 2, 1, 3]), ("key", [0, 2, 3, 1]), ("value", [0, 2, 1, 3])):
            # query and key columns of RMS norm 1.4: attention scores of std ~2, not uniform
            h = self.linear(
                x, f"{p}/attention/self/{part}", HIDDEN, HIDDEN, 1.0 if part == "value" else 1.4
            )
            h = self.op("Reshape", [h, "heads_shape"], f"{p}/attention/self/{part}/Reshape")
            heads.append(
                self.op("Transpose", [h], f"{p}/attention/self/{part}/Transpose", perm=perm)
            )
        q, k, v = heads
        scores = self.op("MatMul", [q, k], f"{p}/attention/self/MatMul")
        scores = self.op("Div", [scores, "head_scale"], f"{p}/attention/self/Div")
        scores = self.op("Add", [scores, mask], f"{p}/attention/self/Add")
        probs = self.op("Softmax", [scores], f"{p}/attention/self/Softmax", axis=-1)
        context = self.op("MatMul", [probs, v], f"{p}/attention/self/MatMul_1")
        context = self.op(
            "Transpose", [context], f"{p}/attention/self/Transpose_3", perm=[0, 2, 1, 3]
        )
        context = self.op("Reshape", [context, "merged_shape"], f"{p}/attention/self/Reshape_3")
        out = self.linear(context, f"{p}/attention/output/dense", HIDDEN, HIDDEN, 1.0)
        return self.layer_norm(
            self.op("Add", [out, x], f"{p}/attention/output/Add"), f"{p}/attention/output/LayerNorm"
        )

    def block(self, x: str, mask: str, index: int) -> str:
        p = f"encoder/layer.{index}"
        x = self.attention(x, mask, p)
        h = self.gelu(
            self.linear(x, f"{p}/intermediate/dense", HIDDEN, FFN, 1.0), f"{p}/intermediate/gelu"
        )
        h = self.linear(h, f"{p}/output/dense", FFN, HIDDEN, 1.0)
        return self.layer_norm(self.op("Add", [h, x], f"{p}/output/Add"), f"{p}/output/LayerNorm")


def build_encoder(seed: int = 0) -> onnx.ModelProto:
    """input_ids, attention_mask, token_type_ids [batch, seq] -> sentence_embedding [batch, 384]."""
    b = EncoderBuilder(seed)
    constants: dict[str, np.ndarray] = {
        "sqrt2": np.array(np.sqrt(2.0), np.float32),
        "one": np.array(1.0, np.float32),
        "half": np.array(0.5, np.float32),
        "head_scale": np.array(np.sqrt(HIDDEN // HEADS), np.float32),
        "mask_min": np.array(-10000.0, np.float32),
        "heads_shape": np.array([0, 0, HEADS, HIDDEN // HEADS], np.int64),
        "merged_shape": np.array([0, 0, HIDDEN], np.int64),
        "mask_axes": np.array([1, 2], np.int64),
        "pool_axes": np.array([1], np.int64),
        "eps": np.array(1e-9, np.float32),
    }
    for name, value in constants.items():
        b.const(name, value)
    words = b.const(
        "embeddings.word_embeddings.weight",
        (0.05 * b.rng.standard_normal((VOCAB, HIDDEN))).astype(np.float32),
    )
    positions = b.const(
        "embeddings.position_embeddings.weight",
        (0.02 * b.rng.standard_normal((POSITIONS, HIDDEN))).astype(np.float32),
    )
    types = b.const(
        "embeddings.token_type_embeddings.weight",
        (0.02 * b.rng.standard_normal((2, HIDDEN))).astype(np.float32),
    )
    shape = b.op("Shape", ["input_ids"], "embeddings/Shape", start=1, end=2)
    position_ids = b.op(
        "Range",
        ["zero", b.op("Squeeze", [shape], "embeddings/Squeeze"), "step"],
        "embeddings/Range",
    )
    b.const("zero", np.array(0, np.int64))
    b.const("step", np.array(1, np.int64))
    x = b.op("Gather", [words, "input_ids"], "embeddings/word_embeddings/Gather")
    x = b.op(
        "Add",
        [x, b.op("Gather", [types, "token_type_ids"], "embeddings/token_type_embeddings/Gather")],
        "embeddings/Add",
    )
    x = b.op(
        "Add",
        [x, b.op("Gather", [positions, position_ids], "embeddings/position_embeddings/Gather")],
        "embeddings/Add_1",
    )
    x = b.layer_norm(x, "embeddings/LayerNorm")
    mask_f = b.op("Cast", ["attention_mask"], "mask/Cast", to=TensorProto.FLOAT)
    inverted = b.op("Sub", ["one", mask_f], "mask/Sub")
    mask = b.op(
        "Mul",
        [b.op("Unsqueeze", [inverted, "mask_axes"], "mask/Unsqueeze"), "mask_min"],
        "mask/Mul",
    )
    for index in range(LAYERS):
        x = b.block(x, mask, index)
    # sentence-transformers' mean pooling over the mask, then L2 normalization
    weights = b.op("Unsqueeze", [mask_f, "mask_axes_last"], "pool/Unsqueeze")
    b.const("mask_axes_last", np.array([-1], np.int64))
    summed = b.op(
        "ReduceSum",
        [b.op("Mul", [x, weights], "pool/Mul"), "pool_axes"],
        "pool/ReduceSum",
        keepdims=0,
    )
    count = b.op("ReduceSum", [weights, "pool_axes"], "pool/Count", keepdims=0)
    pooled = b.op("Div", [summed, b.op("Max", [count, "eps"], "pool/Max")], "pool/Div")
    norm = b.op("ReduceL2", [pooled], "normalize/ReduceL2", axes=[1], keepdims=1)
    b.nodes.append(
        helper.make_node(
            "Div",
            [pooled, b.op("Max", [norm, "eps"], "normalize/Max")],
            ["sentence_embedding"],
            name="normalize/Div",
        )
    )
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
        for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    graph = helper.make_graph(
        b.nodes,
        "minilm_like_encoder",
        inputs,
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", HIDDEN])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def sentences(count: int, seed: int) -> dict[str, np.ndarray]:
    """``count`` padded sentences of Zipf-distributed word ids (ids 1000.. like WordPiece words)."""
    rng = np.random.default_rng(seed)
    order = np.random.default_rng(12345).permutation(np.arange(1000, VOCAB))  # fixed word ranks
    ids = np.full((count, SEQ), PAD, np.int64)
    mask = np.zeros((count, SEQ), np.int64)
    for row in range(count):
        length = int(rng.integers(12, SEQ + 1))
        ranks = np.minimum(rng.zipf(1.15, length - 2), len(order)) - 1
        ids[row, :length] = [CLS, *order[ranks], SEP]
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def build(folder: Path, seed: int) -> None:
    """enc.onnx, calib/ (16 batches of 16) and eval.npz (128 other sentences) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(build_encoder(seed), str(folder / "enc.onnx"))
    calib = folder / "calib"
    calib.mkdir(exist_ok=True)
    for index in range(CALIBRATION_BATCHES):
        save_npz(calib / f"batch_{index:02d}.npz", sentences(BATCH, seed + 100 + index))
    save_npz(folder / "eval.npz", sentences(EVAL_SEQUENCES, seed + 1))


def save_npz(path: Path, arrays: dict[str, Any]) -> None:
    np.savez(path, **arrays)


def embeddings(path: Path, data: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate(
        [
            sess.run(None, {k: v[i : i + 32] for k, v in data.items()})[0]
            for i in range(0, len(data["input_ids"]), 32)
        ]
    ).astype(np.float64)


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks


def quality(original: Path, compressed: Path, data: dict[str, np.ndarray]) -> dict[str, float]:
    """Embedding rel-L2, mean cosine to the original, and the Spearman correlation of all
    pairwise cosine similarities (compressed vs original) on the held-out sentences."""
    ref, new = embeddings(original, data), embeddings(compressed, data)
    upper = np.triu_indices(len(ref), 1)
    sims_ref, sims_new = (ref @ ref.T)[upper], (new @ new.T)[upper]
    spearman = float(np.corrcoef(_ranks(sims_ref), _ranks(sims_new))[0, 1])
    cos = np.sum(ref * new, axis=1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(new, axis=1)
    return {
        "rel_l2": float(np.linalg.norm(new - ref) / np.linalg.norm(ref)),
        "mean_cosine": float(np.mean(cos)),
        "similarity_spearman": spearman,
    }


def run_optimize(folder: Path, budget: float, extra: str) -> dict[str, Any]:
    """One ``onnxpress optimize`` in a child process: wall, CPU and peak RSS from wait4."""
    out, report = folder / f"svd_{budget}.onnx", folder / f"svd_{budget}.json"
    spec = f"svd{{budget={budget}{',' + extra if extra else ''}}}"
    command = [
        sys.executable,
        "-m",
        "onnxpress.cli",
        "optimize",
        str(folder / "enc.onnx"),
        "--passes",
        spec,
        "--calibration",
        str(folder / "calib"),
        "-o",
        str(out),
        "--report",
        str(report),
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read() if proc.stderr else ""
    if status != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr}")
    record = json.loads(report.read_text())["passes"][0]
    details = record["details"]
    return {
        "command": " ".join(command[1:]),
        "spec": spec,
        "wall_s": seconds,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "pass_s": record["seconds"],
        "verification": record["verification"]["value"],
        "factored": [
            {"weight": d["weight"], "k": d["k"], "n": d["n"], "rank": d["rank"]} for d in details
        ],
        "output": str(out),
    }


def layer_kind(weight: str) -> str:
    for part in ("query", "key", "value", "attention/output", "intermediate", "output/dense"):
        if part in weight:
            return part.split("/")[0] if part != "output/dense" else "ffn-out"
    return "other"


def summary(row: dict[str, Any]) -> str:
    kinds: dict[str, list[int]] = {}
    for item in row["factored"]:
        kind = layer_kind(item["weight"])
        kind = {"intermediate": "ffn-in", "attention": "attn-out"}.get(kind, kind)
        kinds.setdefault(kind, []).append(item["rank"])
    return "; ".join(f"{kind} {len(ranks)}: {ranks}" for kind, ranks in kinds.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path("/tmp/svd_encoder"),
        help="where the encoder, data and results go",
    )
    parser.add_argument(
        "--budget", type=float, action="append", help="svd budget (repeatable; default 0.75)"
    )
    parser.add_argument("--extra", default="", help="more svd options, e.g. sensitivity=false")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not (args.dir / "enc.onnx").exists():
        build(args.dir, args.seed)
    data = dict(np.load(args.dir / "eval.npz"))
    rows = []
    for budget in args.budget or [0.75]:
        row = run_optimize(args.dir, budget, args.extra)
        row.update(quality(args.dir / "enc.onnx", Path(row["output"]), data))
        rows.append(row)
        print(
            f"{row['spec']}: {row['wall_s']:.1f} s wall, {row['cpu_s']:.1f} s CPU, {row['peak_rss_mib']:.0f} MiB peak; rel-L2 {row['rel_l2']:.4f}, Spearman {row['similarity_spearman']:.4f}; {summary(row)}"
        )
    results = {
        "date": datetime.date.today().isoformat(),
        "cpu": platform.processor() or platform.machine(),
        "load": os.getloadavg(),
        "model_mb": (args.dir / "enc.onnx").stat().st_size / 1e6,
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
