"""Run an arm64-linux ``onnxpress compile`` output under qemu-user and check it against ORT.

  python tools/arm_emulate.py OUT_FOLDER --verify model.onnx [--inputs x.npz]
         [--emulator build/arm-emulator]

The folder's library is loaded by an aarch64 CPython with the aarch64 TVM runtime wheel
(built by tools/setup_arm_emulator.sh) inside ``qemu-aarch64``; its outputs come back in an
.npz and are compared with onnxruntime on x86 (max |diff| / max |ref| per output). Timings
under qemu are meaningless; this checks numerics only. Exit 0 when they match.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from onnxpress.backends.tvm.runtime import compare_outputs, load_manifest, reference_outputs
from onnxpress.core.io import prepare_model

_RUNNER = """
import sys, json, numpy as np, tvm
from tvm import relax
folder, inputs, out = sys.argv[1:4]
manifest = json.load(open(folder + "/manifest.json"))
vm = relax.VirtualMachine(tvm.runtime.load_module(folder + "/" + manifest["library"]), tvm.cpu())
data = np.load(inputs)
args = [tvm.runtime.tensor(np.ascontiguousarray(data[e["name"]])) for e in manifest["inputs"]]
res = vm["main"](*args)
res = [res] if hasattr(res, "numpy") else list(res)
np.savez(out, **{e["name"]: r.numpy() for e, r in zip(manifest["outputs"], res)})
"""


def _inputs(manifest: dict[str, object], path: str | None, seed: int) -> dict[str, np.ndarray]:
    entries = manifest["inputs"]
    assert isinstance(entries, list)
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    data = np.load(path, allow_pickle=False) if path else None
    for entry in entries:
        shape, dtype = entry["shape"], np.dtype(entry["dtype"])
        if data is not None:
            feed[entry["name"]] = np.asarray(data[entry["name"]])[: shape[0]].astype(dtype)
        else:
            feed[entry["name"]] = rng.standard_normal(shape).astype(dtype)
    return feed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--verify", required=True, metavar="MODEL")
    parser.add_argument("--inputs", help=".npz keyed by input name (default: seeded random)")
    parser.add_argument("--emulator", default="build/arm-emulator")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    qemu = shutil.which("qemu-aarch64")
    root = Path(args.emulator).resolve()
    python = root / "sysroot" / "usr" / "bin" / "python3.11"
    if qemu is None or not python.exists():
        print(f"no emulator: run tools/setup_arm_emulator.sh {root}", file=sys.stderr)
        return 2
    manifest = load_manifest(args.folder)
    feed = _inputs(manifest, args.inputs, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        feed_any: dict[str, Any] = dict(feed)
        np.savez(Path(tmp) / "in.npz", **feed_any)
        (Path(tmp) / "run.py").write_text(_RUNNER)
        env = {
            "PYTHONPATH": str(root / "site"),
            "PYTHONHOME": str(root / "sysroot" / "usr"),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        }
        cmd = [
            qemu,
            "-L",
            str(root / "sysroot"),
            str(python),
            str(Path(tmp) / "run.py"),
            str(Path(args.folder).resolve()),
            str(Path(tmp) / "in.npz"),
            str(Path(tmp) / "out.npz"),
        ]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if done.returncode != 0:
            print(
                done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed",
                file=sys.stderr,
            )
            return 1
        with np.load(Path(tmp) / "out.npz") as out:
            got = {k: np.asarray(out[k]) for k in out.files}
    model, _ = prepare_model(args.verify)
    errors = compare_outputs(reference_outputs(model, feed), got)
    ok = all(v <= args.tolerance for v in errors.values())
    print(json.dumps({"errors": errors, "limit": args.tolerance, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
