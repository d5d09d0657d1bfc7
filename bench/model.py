"""The benchmark model: one GRU, exported for `hiddenstate serve`, kept for the baseline.

A 1-layer GRU with 64 hidden units over 8 features, forecasting the 8
features (regression), built with `export.RecurrentNet` from a fixed seed.
`build(folder)` writes, once:

    folder/model.onnx     the step graph `hiddenstate serve` loads (export_onnx:
                          parity with PyTorch checked before it is written)
    folder/model.pt       the same weights as a PyTorch state dict, for the
                          hand-written baseline consumer (bench/baseline.py)
    folder/config.json    the NetConfig, so the baseline rebuilds the same net

Both subjects of the benchmark therefore compute the same function.
`build_shadow(folder)` writes `folder/shadow.onnx`: the same net (cell, sizes, features)
trained from another seed, as version 2: what `--shadow-model` steps beside it when
the benchmark measures the cost of a shadow of the same size.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

FEATURES = 8
HIDDEN = 64
NAME = "bench-gru"
SEED = 0
SHADOW_SEED = 1


def feature_names() -> tuple[str, ...]:
    return tuple(f"f{i}" for i in range(FEATURES))


def build(folder: Path) -> Path:
    """Write the model files into `folder` unless they are there; returns model.onnx."""
    onnx_path = folder / "model.onnx"
    if onnx_path.exists() and (folder / "model.pt").exists():
        return onnx_path
    import torch

    from export import ModelInfo, NetConfig, RecurrentNet, export_onnx

    torch.manual_seed(SEED)
    config = NetConfig(
        cell="gru", task="regression", n_features=FEATURES, n_outputs=FEATURES, hidden=HIDDEN
    )
    net = RecurrentNet(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    export_onnx(net, onnx_path, ModelInfo(name=NAME, task="regression", features=feature_names()))
    torch.save(net.state_dict(), folder / "model.pt")
    (folder / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    return onnx_path


def build_shadow(folder: Path) -> Path:
    """Write `folder/shadow.onnx` unless it is there (see the module docstring)."""
    onnx_path = folder / "shadow.onnx"
    if onnx_path.exists():
        return onnx_path
    import torch

    from export import ModelInfo, NetConfig, RecurrentNet, export_onnx

    torch.manual_seed(SHADOW_SEED)
    config = NetConfig(
        cell="gru", task="regression", n_features=FEATURES, n_outputs=FEATURES, hidden=HIDDEN
    )
    net = RecurrentNet(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    info = ModelInfo(name=NAME, task="regression", features=feature_names(), version="2")
    export_onnx(net, onnx_path, info)
    return onnx_path


def load_torch(folder: Path):  # -> export.RecurrentNet (torch is imported lazily)
    """The PyTorch net with the exported weights, in eval mode."""
    import torch

    from export import NetConfig, RecurrentNet

    config = NetConfig(**json.loads((folder / "config.json").read_text()))
    net = RecurrentNet(config)
    net.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    return net.eval()


if __name__ == "__main__":
    import sys

    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "artifacts/bench/model")))
