"""The exported file is all the server needs: it loads and steps with torch made unimportable."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

from export.models import NetConfig, RecurrentNet
from export.onnx_export import export_onnx

REPO = Path(__file__).resolve().parents[3]

_SERVE_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import numpy as np
import onnxruntime as ort
from pipeline.model_spec import ModelSpec

session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
spec = ModelSpec.from_metadata(session.get_modelmeta().custom_metadata_map, source=sys.argv[1])
batch = 5
states = {s.name: np.zeros((batch, *s.shape), np.float32) for s in spec.states}
for step in range(3):
    x = np.full((batch, len(spec.input.features)), step, np.float32)
    results = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x, **states})))
    states = {s.name: results[s.output] for s in spec.states}
y = results[spec.outputs[0].name]
print(spec.identity, y.shape, float(np.abs(states["h"]).sum()) > 0, "torch" in sys.modules and sys.modules["torch"] is None)
"""


def test_exported_file_loads_and_steps_in_a_process_without_torch(
    tmp_path: Path, make_info
) -> None:
    torch.manual_seed(0)
    net = RecurrentNet(
        NetConfig(cell="lstm", task="regression", n_features=3, n_outputs=3, hidden=4)
    )
    path = tmp_path / "served.onnx"
    spec = export_onnx(net, path, make_info(), exporter="torchscript")
    run = subprocess.run(
        [sys.executable, "-c", _SERVE_WITHOUT_TORCH, str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"{spec.identity} (5, 3) True True"


def test_pipeline_package_never_imports_torch_or_export() -> None:
    pattern = re.compile(r"^\s*(import torch|from torch|from export|import export)", re.MULTILINE)
    offenders = [p.name for p in (REPO / "pipeline").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
