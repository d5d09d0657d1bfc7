"""`hiddenstate train|export|verify`, called as the entry points call them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export.checkpoint import load_checkpoint, save_checkpoint
from export.cli import export_main, train_main, verify_main

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "demo"
    code = train_main(
        [
            "gru-vowels",
            "--out",
            str(out),
            "--epochs",
            "2",
            "--hidden",
            "8",
            "--layers",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0
    return out


@pytest.fixture(scope="module")
def exported(trained: Path) -> Path:
    assert export_main([str(trained), "--exporter", "torchscript"]) == 0
    return trained / "model.onnx"


def test_train_writes_the_four_artifacts(trained: Path) -> None:
    names = {p.name for p in trained.iterdir()}
    assert {"model.pt", "training-curve.png", "metrics.json", "holdout-events.jsonl"} <= names
    assert json.loads((trained / "metrics.json").read_text())["name"] == "gru-vowels"


def test_train_prints_the_held_out_metric_against_the_baseline(trained: Path, capsys) -> None:
    # The fixture's output went to an earlier capture; train again briefly and read this one.
    code = train_main(
        [
            "gru-vowels",
            "--out",
            str(trained.parent / "again"),
            "--epochs",
            "1",
            "--hidden",
            "4",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "gru-vowels: held-out accuracy" in out
    assert "majority_class" in out


def test_export_writes_model_onnx_beside_the_checkpoint_with_its_weights_hash(
    trained: Path, exported: Path
) -> None:
    import onnx

    from pipeline.model_spec import ModelSpec

    assert exported == trained / "model.onnx"
    spec = ModelSpec.from_metadata(
        {p.key: p.value for p in onnx.load(str(exported)).metadata_props}
    )
    assert spec.weights_sha256 == load_checkpoint(trained / "model.pt").weights_sha256
    assert spec.name == "gru-vowels"


def test_verify_passes_on_a_fresh_export(exported: Path, capsys) -> None:
    assert verify_main([str(exported)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok: {exported}")
    assert "model.pt" in out


def test_verify_finds_the_checkpoint_by_weights_hash_under_any_name(
    exported: Path, tmp_path: Path
) -> None:
    shutil.copy(exported, tmp_path / "served.onnx")
    shutil.copy(exported.with_name("model.pt"), tmp_path / "renamed.pt")
    assert verify_main([str(tmp_path / "served.onnx")]) == 0


def test_verify_fails_in_one_line_when_the_checkpoint_weights_changed(
    exported: Path, tmp_path: Path, capsys
) -> None:
    loaded = load_checkpoint(exported.with_name("model.pt"))
    with torch.no_grad():
        loaded.net.head.bias.add_(0.5)
    changed = tmp_path / "changed.pt"
    save_checkpoint(changed, loaded.net, loaded.info)
    code = verify_main([str(exported), "--checkpoint", str(changed)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1
    assert err.startswith("hiddenstate verify: error:")
    assert "re-export" in err


def test_verify_without_any_checkpoint_asks_for_one(exported: Path, tmp_path: Path, capsys) -> None:
    shutil.copy(exported, tmp_path / "alone.onnx")
    assert verify_main([str(tmp_path / "alone.onnx")]) == 1
    assert "pass --checkpoint" in capsys.readouterr().err


def test_verify_of_a_missing_file_is_one_clear_line(tmp_path: Path, capsys) -> None:
    assert verify_main([str(tmp_path / "nope.onnx")]) == 1
    assert (
        capsys.readouterr().err
        == f"hiddenstate verify: error: {tmp_path / 'nope.onnx'}: no such ONNX file\n"
    )


def test_export_of_something_that_is_not_a_checkpoint_is_one_clear_line(
    tmp_path: Path, capsys
) -> None:
    bogus = tmp_path / "model.pt"
    torch.save({"weights": 1}, bogus)
    assert export_main([str(bogus)]) == 1
    err = capsys.readouterr().err
    assert "not a hiddenstate checkpoint" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("main", "prog"),
    [
        (train_main, "hiddenstate train"),
        (export_main, "hiddenstate export"),
        (verify_main, "hiddenstate verify"),
    ],
)
def test_help_names_the_subcommand_and_exits_zero(main, prog: str, capsys) -> None:
    assert main(["--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: {prog}")


def test_bad_arguments_exit_with_two(capsys) -> None:
    assert train_main(["no-such-preset"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_cli_module_does_not_import_torch_for_help() -> None:
    probe = "import sys, export.cli; print('torch' in sys.modules)"
    run = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert run.stdout.strip() == "False"
