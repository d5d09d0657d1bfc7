"""The `hiddenstate` command.

Each subcommand is a function `main(argv: list[str]) -> int`. The serving
commands live in `pipeline`; the offline ones (train, export, verify) live in
`export` and are found through the `hiddenstate.commands` entry-point group,
so this package never imports `export` or torch and the serving image can
leave both out.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from importlib.metadata import entry_points

from pipeline import logs
from pipeline.errors import HiddenstateError

CommandMain = Callable[[list[str]], int]

# name -> (module, function, one-line help). Imported only when chosen.
_BUILTIN: dict[str, tuple[str, str, str]] = {
    "serve": (
        "pipeline.serve",
        "main",
        "serve a model: one hidden state per stream, one step per event",
    ),
    "produce": (
        "pipeline.devtools.produce",
        "main",
        "send events to a topic from a file or the synthetic generator",
    ),
    "watch": (
        "pipeline.devtools.watch",
        "main",
        "print predictions from an output topic as they arrive",
    ),
    "kafka": (
        "pipeline.devtools.local_kafka",
        "main",
        "start, stop or check the local Kafka broker",
    ),
    "registry": (
        "pipeline.devtools.local_registry",
        "main",
        "start, stop or check the local Schema Registry (Apicurio)",
    ),
}

_PLUGIN_GROUP = "hiddenstate.commands"


def _plugins() -> dict[str, str]:
    """Offline commands installed with the `export` extra: name -> 'module:function'."""
    return {ep.name: ep.value for ep in entry_points(group=_PLUGIN_GROUP)}


def _usage() -> str:
    lines = ["usage: hiddenstate COMMAND [ARGS...]", "", "serving commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, _, help_) in sorted(_BUILTIN.items())]
    plugins = sorted(_plugins())
    if plugins:
        lines += ["", "offline commands (the `export` extra):"]
        lines += [f"  {name}" for name in plugins]
    lines += ["", "`hiddenstate COMMAND --help` describes one command."]
    return "\n".join(lines)


def _resolve(name: str) -> CommandMain | None:
    if name in _BUILTIN:
        module, function, _ = _BUILTIN[name]
        command: CommandMain = getattr(importlib.import_module(module), function)
        return command
    for ep in entry_points(group=_PLUGIN_GROUP, name=name):
        try:
            loaded: CommandMain = ep.load()
        except ImportError as exc:
            raise HiddenstateError(
                f"`hiddenstate {name}` needs the offline extra, which is not installed "
                f"({exc}); install it with: pip install 'hiddenstate[export]'"
            ) from exc
        return loaded
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hiddenstate` console script."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    logs.configure(logs.requested_format(args[1:], os.environ), logging.INFO)
    if args[0] == "serve":
        # Until serve's own handler takes over (pipeline.serve.StopRequest), a stop while
        # the heavy modules load ends the process cleanly: nothing was served yet.
        signal.signal(signal.SIGTERM, _stop_before_serving)
    try:
        command = _resolve(args[0])
        if command is None:
            print(f"hiddenstate: unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
            return 2
        return command(args[1:])
    except HiddenstateError as exc:
        logs.report_error(f"hiddenstate {args[0]}: error: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130


def _stop_before_serving(signum: int, frame: object) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    sys.exit(main())
