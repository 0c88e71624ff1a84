"""The real-size architectures of tools/bench_tvm_zoo.py, exported to ONNX at bench time with
random weights (speed only; nothing is downloaded or committed).

  export(name, batch) -> (onnx.ModelProto, {input name: array})

Names: resnet18, resnet50, mobilenet_v2, mobilenet_v3_small, efficientnet_b0 (torchvision,
``weights=None``, 3x224x224); encoder (transformers' BertModel sized like all-MiniLM-L6: 6
layers, hidden 384, 12 heads, intermediate 1536, sequence 128); gru and lstm (2 layers,
hidden 256, 64 input features, T=50, batch-first); unet (a 3-level U-Net, 32-64-128
channels, ConvTranspose upsampling, 3x128x128). torch, torchvision and transformers are the
``bench`` extra; each is imported only when a model needs it.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

ZOO = (
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "encoder",
    "gru",
    "lstm",
    "unet",
)
TORCHVISION = ZOO[:5]
SEQUENCE, STEPS, FEATURES, HIDDEN = 128, 50, 64, 256
_KEEP: list[Any] = []  # the torch.library shim below must stay alive


def _torchvision() -> Any:
    """torchvision's model definitions. PyPI's torchvision wheel is built against CUDA torch:
    with the CPU torch its C ops do not load, and its import then fails registering fake
    kernels for ``torchvision::nms``/``qnms``. Their schemas are declared first in that case
    (the zoo uses none of torchvision's C ops)."""
    import torch

    try:
        import torchvision
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
        library = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _KEEP.append(library)
        for module in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[module]
        import torchvision
    return torchvision


def _export(module: Any, example: tuple[Any, ...], names: list[str]) -> onnx.ModelProto:
    """TorchScript-based export at opset 17 (static shapes: the zoo compiles one batch size)."""
    import torch

    buffer: Any = io.BytesIO()  # export takes a file object too
    with torch.no_grad():
        torch.onnx.export(
            module.eval(),
            example,
            buffer,
            input_names=names,
            output_names=["output"],
            opset_version=17,
            dynamo=False,
        )
    return onnx.load_from_string(buffer.getvalue())


def _unet() -> Any:
    import torch
    from torch import nn

    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        )

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down1, self.down2, self.bottom = block(3, 32), block(32, 64), block(64, 128)
            self.pool = nn.MaxPool2d(2)
            self.up2, self.dec2 = nn.ConvTranspose2d(128, 64, 2, stride=2), block(128, 64)
            self.up1, self.dec1 = nn.ConvTranspose2d(64, 32, 2, stride=2), block(64, 32)
            self.head = nn.Conv2d(32, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skip1 = self.down1(x)
            skip2 = self.down2(self.pool(skip1))
            deep = self.bottom(self.pool(skip2))
            up = self.dec2(torch.cat([self.up2(deep), skip2], 1))
            return self.head(self.dec1(torch.cat([self.up1(up), skip1], 1)))

    return UNet()


def _encoder(batch: int, rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, Any]]:
    import torch

    _torchvision()  # transformers imports torchvision when it is installed
    import transformers

    # typed loosely: without the bench extra, mypy sees no transformers
    bert_model: Any = transformers.BertModel
    bert_config: Any = transformers.BertConfig
    config = bert_config(
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        attn_implementation="eager",
    )
    bert = bert_model(config, add_pooling_layer=False)

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]

    ids = rng.integers(0, config.vocab_size, (batch, SEQUENCE))
    feed = {
        "input_ids": ids.astype(np.int64),
        "attention_mask": np.ones((batch, SEQUENCE), np.int64),
    }
    example = tuple(torch.from_numpy(a) for a in feed.values())
    return _export(Encoder(), example, list(feed)), feed


def _recurrent(kind: str) -> Any:
    import torch
    from torch import nn

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            cell = nn.GRU if kind == "gru" else nn.LSTM
            self.rnn = cell(FEATURES, HIDDEN, num_layers=2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(x)[0]

    return Recurrent()


def export(name: str, batch: int, seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The zoo model ``name`` at ``batch`` (fixed seed: same weights on every call) and a
    random input feed for it."""
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if name == "encoder":
        return _encoder(batch, rng)
    builders: dict[str, Callable[[], Any]] = {
        "gru": lambda: _recurrent("gru"),
        "lstm": lambda: _recurrent("lstm"),
        "unet": _unet,
    }
    if name in TORCHVISION:
        module = getattr(_torchvision().models, name)(weights=None)
        shape: tuple[int, ...] = (batch, 3, 224, 224)
    else:
        module = builders[name]()
        shape = (batch, STEPS, FEATURES) if name in ("gru", "lstm") else (batch, 3, 128, 128)
    feed = {"input": rng.standard_normal(shape).astype(np.float32)}
    return _export(module, (torch.from_numpy(feed["input"]),), ["input"]), feed
