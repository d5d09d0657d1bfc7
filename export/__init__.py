"""hiddenstate's offline side: models, data, training, ONNX step export and parity.

The public API::

    from export import RecurrentNet, NetConfig, Steppable, as_steppable
    from export import ModelInfo, OutputInfo, export_onnx, verify_onnx

Training lives in `export.train` and the data sets in `export.data`; the
command line is `export.cli` (`hiddenstate train|export|verify`).
"""

from export.adapter import as_steppable
from export.info import ModelInfo, OutputInfo
from export.models import CELLS, NetConfig, RecurrentNet
from export.onnx_export import export_onnx
from export.protocol import Steppable

__all__ = [
    "CELLS",
    "ModelInfo",
    "NetConfig",
    "OutputInfo",
    "RecurrentNet",
    "Steppable",
    "as_steppable",
    "export_onnx",
]
