"""`hiddenstate train`, `hiddenstate export`, `hiddenstate verify`: the offline subcommands.

`pipeline.cli` finds these three functions through the `hiddenstate.commands`
entry points. Each parses its own arguments, returns an exit code and prints
a `HiddenstateError` as one line on stderr, with no traceback. torch is
imported only inside the functions, so `--help` stays fast.

Exit codes: 0 success, 1 a HiddenstateError (refused export, parity failure,
bad file, a model that does not beat its baselines with `--require-beat`),
2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import HiddenstateError

_PRESET_NAMES = ("gru-vowels", "gru-synthetic", "lstm-motions", "rnn-chars")
_DEFAULT_OUT = Path("artifacts")


def train_main(argv: list[str]) -> int:
    """`hiddenstate train`: fit a preset (or a custom cell on a data set) and write its artifacts."""
    parser = argparse.ArgumentParser(
        prog="hiddenstate train",
        description=(
            "Train a recurrent model on data shipped with the install (no download) and write "
            "model.pt, training-curve.png, metrics.json and holdout-events.jsonl into "
            "artifacts/<name>/. With no preset, trains the demo classifier (gru-vowels, about "
            "a minute on 2 cores)."
        ),
        epilog=(
            "presets: gru-vowels (speaker per frame, JapaneseVowels), gru-synthetic (next sensor "
            "readings, synthetic fleet), lstm-motions (next accelerometer/gyro reading, "
            "BasicMotions), rnn-chars (next character of Python's documentation). "
            "`hiddenstate train --report` trains all four and prints the baseline table."
        ),
    )
    parser.add_argument(
        "preset", nargs="?", choices=_PRESET_NAMES, help="what to train (default gru-vowels)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="output folder (default artifacts/<name>, or artifacts/ with --report)",
    )
    parser.add_argument("--name", help="model name in the metadata (default: the preset's name)")
    parser.add_argument("--version", default="1", help="model version in the metadata (default 1)")
    parser.add_argument(
        "--cell", choices=("rnn_tanh", "rnn_relu", "lstm", "gru"), help="override the preset's cell"
    )
    parser.add_argument("--layers", type=int, help="override the number of recurrent layers")
    parser.add_argument("--hidden", type=int, help="override the hidden size")
    parser.add_argument("--epochs", type=int, help="override the maximum number of epochs")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for data split, init and batches (default 0)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="small synthetic data and few epochs (smoke tests)"
    )
    parser.add_argument(
        "--export", action="store_true", help="also export model.onnx (with its parity check)"
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="train every preset; print and write the baseline table",
    )
    parser.add_argument(
        "--require-beat", action="store_true", help="exit 1 if a model does not beat every baseline"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return _run(parser, argv, _train)


def export_main(argv: list[str]) -> int:
    """`hiddenstate export`: write the ONNX step graph of a checkpoint, with metadata and parity."""
    parser = argparse.ArgumentParser(
        prog="hiddenstate export",
        description=(
            "Export a checkpoint written by `hiddenstate train` as one ONNX single-step graph "
            "(docs/step-contract.md): inputs x and the states, outputs the predictions and the "
            "new states, batch dynamic on axis 0. Every export proves parity with PyTorch and "
            "writes nothing if it fails. For your own nn.Module use export.export_onnx()."
        ),
    )
    parser.add_argument("checkpoint", type=Path, help="model.pt, or the folder that holds it")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        help="ONNX file to write (default: model.onnx beside the checkpoint)",
    )
    parser.add_argument(
        "--exporter",
        choices=("auto", "dynamo", "torchscript"),
        default="auto",
        help="auto: dynamo, except TorchScript for nn.RNN or when dynamo fails (default)",
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset, >= 17 (default 18)")
    parser.add_argument(
        "--parity-sequences",
        type=int,
        default=16,
        help="sequences in the parity check (default 16)",
    )
    parser.add_argument(
        "--parity-steps", type=int, default=24, help="longest parity sequence (default 24)"
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-5,
        help="largest absolute difference allowed (default 1e-5)",
    )
    return _run(parser, argv, _export)


def verify_main(argv: list[str]) -> int:
    """`hiddenstate verify MODEL.onnx`: re-run the parity check against the model's checkpoint."""
    parser = argparse.ArgumentParser(
        prog="hiddenstate verify",
        description=(
            "Check an exported step graph. Its metadata must follow the step contract, its graph "
            "must have no Loop/Scan, and stepping it in onnxruntime must reproduce the PyTorch "
            "model within the tolerance on sequences of different lengths. The PyTorch model is "
            "the checkpoint whose weights sha256 matches the file's metadata: --checkpoint, else "
            "<stem>.pt, model.pt or any *.pt beside the file."
        ),
    )
    parser.add_argument("model", type=Path, help="the .onnx file")
    parser.add_argument("--checkpoint", type=Path, help="the checkpoint it was exported from")
    parser.add_argument(
        "--sequences", type=int, default=16, help="sequences to compare (default 16)"
    )
    parser.add_argument("--max-steps", type=int, default=24, help="longest sequence (default 24)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-5,
        help="largest absolute difference allowed (default 1e-5)",
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of the random sequences (default 1)"
    )
    return _run(parser, argv, _verify)


def _run(
    parser: argparse.ArgumentParser, argv: list[str], action: Callable[[argparse.Namespace], int]
) -> int:
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): report it as a return code
        return int(exc.code or 0)
    try:
        return action(args)
    except HiddenstateError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def _train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from export.data import load_dataset
    from export.models import NetConfig
    from export.presets import DEMO_PRESET, PRESETS
    from export.report import baseline_table, machine_line, secondary_table
    from export.train import CHECKPOINT_FILE, train

    names = list(PRESETS) if args.report else [args.preset or DEMO_PRESET]
    root = args.out or _DEFAULT_OUT
    all_metrics: list[dict[str, Any]] = []
    for preset_name in names:
        preset = PRESETS[preset_name]
        dataset = load_dataset(preset.dataset, seed=args.seed, quick=args.quick)
        net_config = NetConfig(
            cell=args.cell or preset.cell,
            task=dataset.task,
            n_features=len(dataset.features),
            n_outputs=dataset.n_outputs,
            hidden=args.hidden or preset.hidden,
            layers=args.layers or preset.layers,
            residual=preset.residual,
        )
        epochs = args.epochs or (min(preset.train.epochs, 5) if args.quick else preset.train.epochs)
        config = replace(preset.train, epochs=epochs, seed=args.seed, progress=not args.no_progress)
        name = args.name if args.name and not args.report else preset_name
        out_dir = root / name if (args.report or args.out is None) else args.out
        result = train(dataset, net_config, config, out_dir, name=name, version=args.version)
        metrics = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
        all_metrics.append(metrics)
        print(_summary(metrics, out_dir))
        if args.export:
            _export_checkpoint(
                out_dir / CHECKPOINT_FILE, out_dir / "model.onnx", "auto", 18, 16, 24, 1e-5
            )
        del result
    if args.report:
        table = (
            f"Machine: {machine_line()}\n\n"
            f"{baseline_table(all_metrics)}\nOther held-out metrics:\n\n{secondary_table(all_metrics)}"
        )
        (root / "report.md").write_text(table, encoding="utf-8")
        print(f"\n{table}\nwritten to {root / 'report.md'}")
    losers = [m["name"] for m in all_metrics if not m["beats_baselines"]]
    if losers and args.require_beat:
        print(
            f"hiddenstate train: error: {', '.join(losers)} did not beat every naive baseline on "
            "held-out data; see metrics.json",
            file=sys.stderr,
        )
        return 1
    return 0


def _export(args: argparse.Namespace) -> int:
    from export.train import CHECKPOINT_FILE

    checkpoint = args.checkpoint / CHECKPOINT_FILE if args.checkpoint.is_dir() else args.checkpoint
    output = args.output or checkpoint.with_name("model.onnx")
    _export_checkpoint(
        checkpoint,
        output,
        args.exporter,
        args.opset,
        args.parity_sequences,
        args.parity_steps,
        args.tolerance,
    )
    return 0


def _export_checkpoint(
    checkpoint: Path,
    output: Path,
    exporter: str,
    opset: int,
    sequences: int,
    steps: int,
    tolerance: float,
) -> None:
    from export.checkpoint import load_checkpoint
    from export.onnx_export import export_onnx

    loaded = load_checkpoint(checkpoint)
    spec = export_onnx(
        loaded.net,
        output,
        loaded.info,
        exporter=exporter,
        opset=opset,
        parity_sequences=sequences,
        parity_max_steps=steps,
        tolerance=tolerance,
    )
    parity = spec.parity
    states = ", ".join(f"{s.name}{list(s.shape)}" for s in spec.states)
    print(
        f"exported {spec.identity} to {output} ({spec.export['exporter']}, opset {opset}); "
        f"states {states} = {spec.state_bytes} bytes per stream; "
        f"parity {parity.max_abs_error:.2g} <= {parity.tolerance:g} over {parity.sequences} "
        f"sequences of up to {parity.max_steps} steps"
        if parity
        else f"exported {spec.identity} to {output}"
    )


def _verify(args: argparse.Namespace) -> int:
    from export.verify import verify_onnx

    result = verify_onnx(
        args.model,
        checkpoint=args.checkpoint,
        sequences=args.sequences,
        max_steps=args.max_steps,
        tolerance=args.tolerance,
        seed=args.seed,
    )
    print(
        f"ok: {args.model} ({result.spec.identity}) matches {result.checkpoint}: max abs error "
        f"{result.parity.max_abs_error:.2g} <= {result.parity.tolerance:g} over "
        f"{result.parity.sequences} sequences of up to {result.parity.max_steps} steps"
    )
    return 0


def _summary(metrics: dict[str, Any], out_dir: Path) -> str:
    primary = metrics["primary"]
    theirs = ", ".join(f"{k} {v[primary]:.4f}" for k, v in metrics["baselines"].items())
    verdict = "beats" if metrics["beats_baselines"] else "does NOT beat"
    return (
        f"{metrics['name']}: held-out {primary} {metrics['model'][primary]:.4f} {verdict} "
        f"the baselines ({theirs}); {metrics['epochs_run']} epochs in {metrics['train_seconds']:.0f} s; "
        f"wrote {out_dir}"
    )
