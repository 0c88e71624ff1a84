"""Train and export ``gru_sunspots.onnx`` (a real ONNX GRU op) and ``gru_sunspots_unrolled.onnx``.

Model: GRU(input 1, hidden 32) over a window of 24 normalised yearly sunspot numbers, then
Linear(32->1) on the last hidden state predicts the next year's (normalised) number.
Data: ``statsmodels.api.datasets.sunspots`` (SUNACTIVITY, 1700-2008). Windows are split
chronologically: the last 20% of windows are held out. Mean and std come from the years
the training windows cover; they are stored in the .npz files and the ONNX metadata.

``gru_sunspots_unrolled.onnx`` holds the same trained weights with the GRU cell written out
in primitive ops (see ``unrolled_gru.py``); a GRU-fusion pass should turn it back into a
single GRU node. Both files are checked against torch and against each other.
Input ``input`` float32 [batch,24,1]; output ``prediction`` float32 [batch,1] (normalised).

Usage: python models/build_gru_sunspots.py
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import torch
from _common import (
    CALIBRATION_SIZE,
    DATA_DIR,
    MODELS_DIR,
    assert_close,
    check_dynamic_batch,
    check_model,
    export,
    make_deterministic,
    predict,
    report,
    run_onnx,
    save_calibration,
    save_npz,
)
from torch import nn
from unrolled_gru import build_unrolled_gru

NAME = "gru_sunspots"
WINDOW = 24
HIDDEN = 32
TEST_FRACTION = 0.2
EPOCHS = 100
BATCH_SIZE = 32
LEARNING_RATE = 3e-3


class SunspotGRU(nn.Module):
    """GRU regressor: 24 years of sunspot numbers -> the next year (gru_sunspots)."""

    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.gru = nn.GRU(input_size=1, hidden_size=hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, last_hidden = self.gru(x)
        return self.head(last_hidden[-1])


def load_windows() -> dict[str, np.ndarray]:
    """Sliding windows over the yearly series, split chronologically, plus the stats."""
    import statsmodels.api as sm

    frame = sm.datasets.sunspots.load_pandas().data
    series = frame["SUNACTIVITY"].to_numpy(dtype=np.float64)
    years = frame["YEAR"].to_numpy().astype(np.int64)
    starts = np.arange(len(series) - WINDOW)
    windows = np.stack([series[s : s + WINDOW] for s in starts])
    targets = series[starts + WINDOW]
    test_count = round(len(starts) * TEST_FRACTION)
    train_count = len(starts) - test_count
    covered = series[: train_count - 1 + WINDOW + 1]  # every year a training window touches
    mean, std = float(covered.mean()), float(covered.std())
    normalised = ((windows - mean) / std).astype(np.float32)[:, :, None]
    return {
        "train_x": normalised[:train_count],
        "train_y": targets[:train_count],
        "test_x": normalised[train_count:],
        "test_y": targets[train_count:],
        "test_years": years[starts[train_count:] + WINDOW],
        "naive": windows[train_count:, -1],
        "mean": np.float64(mean),
        "std": np.float64(std),
    }


def train(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
) -> None:
    """Mini-batch Adam on mean squared error (normalised units) with cosine decay."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)
    loss_fn = nn.MSELoss()
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(inputs), generator=generator)
        loss_sum = 0.0
        for start in range(0, len(inputs), BATCH_SIZE):
            index = order[start : start + BATCH_SIZE]
            loss = loss_fn(model(inputs[index]), targets[index])
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            loss_sum += loss.item() * len(index)
        schedule.step()
        if (epoch + 1) % 25 == 0:
            print(f"  epoch {epoch + 1:3d}/{EPOCHS}: train mse {loss_sum / len(inputs):.4f}")
    model.eval()


def rmse(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Root mean squared error in the units of ``actual``."""
    return float(np.sqrt(np.mean((predicted.astype(np.float64) - actual) ** 2)))


def finish(path: str, mean: float, std: float) -> None:
    """Record the normalisation in metadata_props and give GRU weights readable names.

    The exporter names the GRU's W, R and B initializers ``onnx::GRU_<n>``; they become
    ``gru.W``, ``gru.R`` and ``gru.B`` (ONNX gate order z, r, h).
    """
    model = onnx.load(path)
    renames: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type == "GRU":
            for index, role in zip((1, 2, 3), "WRB", strict=True):
                if len(node.input) > index and node.input[index]:
                    renames[node.input[index]] = f"gru.{role}"
                    node.input[index] = f"gru.{role}"
    for tensor in model.graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    onnx.helper.set_model_props(
        model, {"sunspots_mean": repr(mean), "sunspots_std": repr(std), "window": str(WINDOW)}
    )
    onnx.save(model, path)


def main() -> None:
    generator = make_deterministic()
    data = load_windows()
    mean, std = float(data["mean"]), float(data["std"])
    train_x = torch.from_numpy(data["train_x"])
    train_y = torch.from_numpy(((data["train_y"] - mean) / std).astype(np.float32)[:, None])
    test_x = data["test_x"]

    model = SunspotGRU()
    print(
        f"{NAME}: {sum(p.numel() for p in model.parameters())} parameters, "
        f"{len(train_x)} train / {len(test_x)} held-out windows, mean {mean:.2f} std {std:.2f}"
    )
    train(model, train_x, train_y, generator)

    torch_out = predict(model, torch.from_numpy(test_x))
    path = MODELS_DIR / f"{NAME}.onnx"
    with warnings.catch_warnings():
        # The exporter warns that a GRU exported at batch 2 may fail at other batch sizes;
        # onnxruntime is checked below at batch 1 and at the full held-out batch.
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size")
        export(model, torch.from_numpy(test_x[:2]), path, output_name="prediction")
    finish(str(path), mean, std)
    onnx_model = check_model(path)
    check_dynamic_batch(onnx_model)
    if "GRU" not in {node.op_type for node in onnx_model.graph.node}:
        raise AssertionError(f"{NAME}: the exported graph has no GRU node")
    onnx_out = run_onnx(path, {"input": test_x})
    assert_close(f"{NAME} onnxruntime vs torch", torch_out, onnx_out)
    assert_close(f"{NAME} at batch 1", torch_out[:1], run_onnx(path, {"input": test_x[:1]}))

    unrolled_path = MODELS_DIR / f"{NAME}_unrolled.onnx"
    weights = {key: value.detach().numpy() for key, value in model.state_dict().items()}
    unrolled = build_unrolled_gru(weights, steps=WINDOW, hidden=HIDDEN)
    onnx.save(unrolled, str(unrolled_path))
    finish(str(unrolled_path), mean, std)
    check_dynamic_batch(check_model(unrolled_path))
    unrolled_out = run_onnx(unrolled_path, {"input": test_x})
    assert_close(f"{NAME}_unrolled onnxruntime vs torch", torch_out, unrolled_out)
    assert_close(f"{NAME}_unrolled vs {NAME} (onnxruntime)", onnx_out, unrolled_out)
    assert_close(
        f"{NAME}_unrolled at batch 1", torch_out[:1], run_onnx(unrolled_path, {"input": test_x[:1]})
    )

    held_out_rmse = rmse(onnx_out[:, 0] * std + mean, data["test_y"])
    naive_rmse = rmse(data["naive"], data["test_y"])
    if held_out_rmse >= naive_rmse:
        raise AssertionError(
            f"{NAME}: RMSE {held_out_rmse:.2f} does not beat naive {naive_rmse:.2f}"
        )
    eval_path = DATA_DIR / f"{NAME}_eval.npz"
    save_npz(
        eval_path,
        {
            "task": np.array("regression"),
            "input": test_x,
            "target": data["test_y"].astype(np.float32),
            "years": data["test_years"],
            "naive": data["naive"].astype(np.float32),
            "mean": np.float64(mean),
            "std": np.float64(std),
            "rmse": np.float64(held_out_rmse),
        },
    )
    calib_path = save_calibration(NAME, "input", data["train_x"][:CALIBRATION_SIZE])
    report(
        NAME,
        path,
        {"held-out RMSE": held_out_rmse, "naive RMSE": naive_rmse},
        [eval_path, calib_path],
    )
    report(f"{NAME}_unrolled", unrolled_path, {}, [])


if __name__ == "__main__":
    main()
