"""Built-in passes. Each module registers one pass with @register_pass; importing this
package (done lazily by the registry on first lookup) makes them all available."""

from onnxpress.passes import (
    cleanup,
    equalize,
    fold_batchnorm,
    fold_constants,
    prune_channels,
    qdq,
    svd,
    toposort,
)
from onnxpress.passes.gru import fuse as fuse_gru
from onnxpress.passes.gru import lower as lower_gru

__all__ = [
    "cleanup",
    "equalize",
    "fold_batchnorm",
    "fold_constants",
    "fuse_gru",
    "lower_gru",
    "prune_channels",
    "qdq",
    "svd",
    "toposort",
]
