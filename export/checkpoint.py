"""Checkpoints of our models, and the weights hash that ties a checkpoint to its ONNX file.

A checkpoint (`model.pt`, written by `hiddenstate train`) is a plain dict
that `torch.load(weights_only=True)` reads without running any pickled
code: the format tag, the `NetConfig`, the `ModelInfo`, the state dict and
its sha256. The exported graph records the same sha256 in its metadata.
That is how `hiddenstate verify` finds the checkpoint an ONNX file came
from, and knows when the weights differ.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from export.info import ModelInfo
from export.models import NetConfig, RecurrentNet
from pipeline.errors import ExportError

CHECKPOINT_FORMAT = "hiddenstate-checkpoint/1"


def weights_sha256(module: nn.Module) -> str:
    """sha256 over every parameter and buffer: names sorted, then name, dtype, shape and bytes.

    Buffers count because ours hold the normalisation statistics, which change
    what the graph computes as surely as the weights do.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode())
        digest.update(str(list(t.shape)).encode())
        # Through uint8 so that every dtype hashes by its exact bytes.
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the rebuilt network (eval mode), what it means, its weights hash."""

    net: RecurrentNet
    info: ModelInfo
    weights_sha256: str
    path: Path


def save_checkpoint(path: Path, net: RecurrentNet, info: ModelInfo) -> str:
    """Write `net` and `info` to `path`; return the weights sha256."""
    sha = weights_sha256(net)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "config": net.config.to_dict(),
            "info": info.to_dict(),
            "state_dict": net.state_dict(),
            "weights_sha256": sha,
        },
        path,
    )
    return sha


def load_checkpoint(path: Path) -> Checkpoint:
    """Rebuild the model saved at `path`; ExportError if it is not a hiddenstate checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such checkpoint; train one with `hiddenstate train`")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ExportError(f"{path}: cannot read as a torch checkpoint ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise ExportError(
            f"{path}: not a hiddenstate checkpoint (format {CHECKPOINT_FORMAT!r}); for your own "
            "model use the Python API export.export_onnx"
        )
    net = RecurrentNet(NetConfig(**raw["config"]))
    net.load_state_dict(raw["state_dict"])
    net.eval()
    sha = weights_sha256(net)
    if sha != raw["weights_sha256"]:
        raise ExportError(
            f"{path}: weights do not match their recorded sha256; the file is damaged"
        )
    return Checkpoint(net=net, info=ModelInfo.from_dict(raw["info"]), weights_sha256=sha, path=path)
