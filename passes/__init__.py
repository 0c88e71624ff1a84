"""Built-in passes, installed as ``onnxpress.passes``. Each small pass is one module; a pass
with steps is a package whose ``__init__`` is the pass (qdq/, svd/, prune_channels/) or that
holds a family of passes (gru/: fuse-gru, lower-gru). Each registers itself with
@register_pass; importing this package (done lazily by the registry on first lookup) makes
them all available.

May import: onnxpress.core, calibration, analysis; the lossy passes not each other (see the
import contracts). Read first: ``cleanup.py`` (a small pass), then ``svd/__init__.py``.
"""

from onnxpress.passes import (
    cleanup,
    equalize,
    fix_saturation,
    fold_batchnorm,
    fold_constants,
    lower_conv_integer,
    lower_einsum,
    prune_channels,
    prune_heads,
    qdq,
    qop_to_qdq,
    svd,
    toposort,
    upcast_float16,
    upgrade_opset,
)
from onnxpress.passes.gru import fuse as fuse_gru
from onnxpress.passes.gru import fuse_lstm, lower_dynamic_lstm, lower_lstm
from onnxpress.passes.gru import lower as lower_gru

__all__ = [
    "cleanup",
    "equalize",
    "fix_saturation",
    "fold_batchnorm",
    "fold_constants",
    "fuse_gru",
    "fuse_lstm",
    "lower_conv_integer",
    "lower_dynamic_lstm",
    "lower_einsum",
    "lower_gru",
    "lower_lstm",
    "prune_channels",
    "prune_heads",
    "qdq",
    "qop_to_qdq",
    "svd",
    "toposort",
    "upcast_float16",
    "upgrade_opset",
]
