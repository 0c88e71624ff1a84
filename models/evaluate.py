"""Measure a bundled model (or an optimized version of it) on its held-out data with onnxruntime.

    python models/evaluate.py models/cnn_mnist.onnx
    python models/evaluate.py out/cnn_mnist.opt.onnx --data models/data/cnn_mnist_eval.npz
    python models/evaluate.py out/model.onnx --kind gru_sunspots --json

Classification sets report top-1 accuracy; the sunspots set reports RMSE in sunspot
numbers (and the naive "same as last year" RMSE for comparison); the detection set reports
COCO-style mAP (IoU 0.50:0.95) and mAP@0.5 (``detection.py``); the super-resolution set
reports PSNR in dB (and bicubic upscaling's); the text-line set reports the character error
rate, character accuracy (1 - CER) and line accuracy of greedy CTC decoding (``text_lines.py``). Without ``--data`` the
data set is chosen from ``--kind`` or, failing that, from the file name: the longest known
model name that the file name starts with (``cnn_mnist.opt.onnx`` -> ``cnn_mnist``).
Needs only numpy and onnxruntime. Inputs are cast to the dtype the model declares, so
float16 models work too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

DATA_DIR = Path(__file__).resolve().parent / "data"
# model name -> name of its evaluation set in DATA_DIR (<set>_eval.npz)
EVAL_SETS = {
    "cnn_mnist": "cnn_mnist",
    "cnn_wide_mnist": "cnn_wide_mnist",
    "mobilenet_mnist": "mobilenet_mnist",
    "mlp_digits": "mlp_digits",
    "transformer_mnist": "transformer_mnist",
    "encoder_digits": "encoder_digits",
    "gru_sunspots": "gru_sunspots",
    "gru_sunspots_unrolled": "gru_sunspots",
    "digit_detector": "digit_detector",
    "sr_photos": "sr_photos",
    "ctc_lines": "ctc_lines",
    "crnn_lines": "crnn_lines",
}
# the headline metric of each task (key in scores() and in the eval set) -> its display name
METRICS = {"accuracy": "accuracy", "rmse": "rmse", "map": "mAP", "psnr": "psnr", "cer": "CER"}
ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


@dataclass(frozen=True)
class Evaluation:
    """One model measured on one held-out set."""

    model: str
    data: str
    metric: str
    value: float
    samples: int
    reference: float | None = None
    naive_rmse: float | None = None
    map50: float | None = None
    bicubic_psnr: float | None = None
    line_accuracy: float | None = None
    character_accuracy: float | None = None

    def describe(self) -> str:
        text = f"{self.model}: {self.metric} {self.value:.4f} on {self.samples} held-out samples"
        if self.reference is not None:
            text += f" (as built: {self.reference:.4f})"
        if self.bicubic_psnr is not None:
            text += f"; bicubic upscaling {self.bicubic_psnr:.4f} dB"
        if self.character_accuracy is not None:
            text += f"; character accuracy {self.character_accuracy:.4f}"
        if self.line_accuracy is not None:
            text += f"; line accuracy {self.line_accuracy:.4f}"
        if self.map50 is not None:
            text += f"; mAP@0.5 {self.map50:.4f}"
        if self.naive_rmse is not None:
            text += f"; naive same-as-last-year RMSE {self.naive_rmse:.4f}"
        return text


def infer_kind(model_path: Path) -> str:
    """The longest known model name that the file name starts with."""
    name = model_path.name
    matches = [kind for kind in EVAL_SETS if name.startswith(kind)]
    if not matches:
        raise ValueError(
            f"{name}: cannot tell the model kind from the file name; "
            f"pass --kind ({', '.join(EVAL_SETS)}) or --data"
        )
    return max(matches, key=len)


def default_data(kind: str) -> Path:
    if kind not in EVAL_SETS:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(EVAL_SETS)}")
    return DATA_DIR / f"{EVAL_SETS[kind]}_eval.npz"


def load_eval_set(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def model_inputs(eval_set: dict[str, np.ndarray]) -> np.ndarray:
    """The held-out inputs as float32, exactly as the original model expects them."""
    if "input" in eval_set:
        return eval_set["input"].astype(np.float32)
    images = eval_set["images"].astype(np.float32) / np.float32(eval_set["divisor"])
    return images.reshape(len(images), *(int(d) for d in eval_set["input_shape"]))


def run_batched(session: ort.InferenceSession, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """Run the first input/output of ``session`` over ``inputs`` in batches."""
    feed = session.get_inputs()[0]
    dtype = ORT_DTYPES.get(feed.type)
    if dtype is None:
        raise ValueError(f"input {feed.name!r} has type {feed.type}; expected a float tensor")
    outputs = [
        np.asarray(
            session.run(None, {feed.name: inputs[start : start + batch_size].astype(dtype)})[0]
        )
        for start in range(0, len(inputs), batch_size)
    ]
    return np.concatenate(outputs).astype(np.float64)


def evaluate(
    model_path: str | Path,
    data_path: str | Path | None = None,
    *,
    kind: str | None = None,
    batch_size: int = 256,
    threads: int = 2,
) -> Evaluation:
    """Run ``model_path`` on its held-out set and compute accuracy or RMSE."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path}: no such model file")
    if data_path is None:
        data_path = default_data(kind or infer_kind(model_path))
    data_path = Path(data_path)
    eval_set = load_eval_set(data_path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    outputs = run_batched(session, model_inputs(eval_set), batch_size)
    try:
        values = scores(eval_set, outputs)
    except ValueError as exc:
        raise ValueError(f"{data_path}: {exc}") from None
    metric = next(key for key in METRICS if key in values)
    reference = float(eval_set[metric]) if metric in eval_set else None
    return Evaluation(
        str(model_path),
        str(data_path),
        METRICS[metric],
        values[metric],
        len(outputs),
        reference,
        values.get("naive_rmse"),
        values.get("map50"),
        values.get("bicubic_psnr"),
        values.get("line_accuracy"),
        values.get("character_accuracy"),
    )


def scores(eval_set: dict[str, np.ndarray], outputs: np.ndarray) -> dict[str, float]:
    """The held-out metrics of ``outputs``, a model's first output on ``model_inputs(eval_set)``:
    accuracy; rmse and naive_rmse (sunspot numbers); map and map50; psnr and bicubic_psnr;
    cer, character_accuracy and line_accuracy."""
    task = str(eval_set["task"])
    if task == "classification":
        labels = eval_set["labels"]
        return {
            "accuracy": float((outputs.reshape(len(labels), -1).argmax(axis=1) == labels).mean())
        }
    if task == "regression":
        target = eval_set["target"].astype(np.float64)
        predicted = outputs.reshape(len(target)) * float(eval_set["std"]) + float(eval_set["mean"])
        naive = eval_set["naive"].astype(np.float64)
        return {
            "rmse": float(np.sqrt(np.mean((predicted - target) ** 2))),
            "naive_rmse": float(np.sqrt(np.mean((naive - target) ** 2))),
        }
    if task == "detection":
        found = _detection().mean_average_precision(outputs, eval_set["boxes"], eval_set["labels"])
        return {"map": found["map"], "map50": found["map50"]}
    if task == "super_resolution":
        return {
            "psnr": psnr(outputs, eval_set["target"]),
            "bicubic_psnr": float(eval_set["bicubic_psnr"]),
        }
    if task == "ctc":
        probabilities = outputs.reshape(len(eval_set["labels"]), -1, outputs.shape[-1])
        cer, lines = _sibling("text_lines").cer_and_line_accuracy(probabilities, eval_set["labels"])
        return {"cer": cer, "line_accuracy": lines, "character_accuracy": 1.0 - cer}
    raise ValueError(f"unknown task {task!r}")


def psnr(outputs: np.ndarray, target: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of 8-bit images (outputs clipped to 0..255)."""
    error = np.mean((np.clip(outputs.astype(np.float64), 0, 255) - target) ** 2)
    return float(10 * np.log10(255.0**2 / max(error, 1e-12)))


def _detection() -> Any:
    """``detection.py`` from this folder (evaluate.py is also loaded by file path)."""
    return _sibling("detection")


def _sibling(stem: str) -> Any:
    """``<stem>.py`` from this folder, loaded by file path once."""
    name = f"models_{stem}"
    if name not in sys.modules:
        path = Path(__file__).with_name(f"{stem}.py")
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="an .onnx file")
    parser.add_argument("--data", type=Path, help="held-out .npz (default: from --kind)")
    parser.add_argument(
        "--kind",
        choices=sorted(EVAL_SETS),
        help="model kind (default: inferred from the file name)",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        result = evaluate(args.model, args.data, kind=args.kind, batch_size=args.batch_size)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(result)) if args.json else result.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
