"""hiddenstate's offline side: models, data, training, ONNX step export and parity.

The public API::

    from export import RecurrentNet, NetConfig, Steppable, as_steppable
    from export import ModelInfo, OutputInfo, export_onnx, verify_onnx

Training lives in `export.train` and the data sets in `export.data`; the
command line is `export.cli` (`hiddenstate train|export|verify`).

The names load lazily, so `import export.cli` (and `hiddenstate --help`)
does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from export.adapter import as_steppable
    from export.info import ModelInfo, OutputInfo
    from export.models import CELLS, NetConfig, RecurrentNet
    from export.onnx_export import export_onnx
    from export.protocol import Steppable
    from export.verify import verify_onnx

_WHERE = {
    "CELLS": "export.models",
    "ModelInfo": "export.info",
    "NetConfig": "export.models",
    "OutputInfo": "export.info",
    "RecurrentNet": "export.models",
    "Steppable": "export.protocol",
    "as_steppable": "export.adapter",
    "export_onnx": "export.onnx_export",
    "verify_onnx": "export.verify",
}

__all__ = [
    "CELLS",
    "ModelInfo",
    "NetConfig",
    "OutputInfo",
    "RecurrentNet",
    "Steppable",
    "as_steppable",
    "export_onnx",
    "verify_onnx",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'export' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
