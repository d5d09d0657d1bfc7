"""How one setting is declared, named, parsed and shown: the machinery behind config.py.

A setting is a dataclass field whose metadata is a `Setting` (made with
`setting(default, help, ...)`). From the field name alone come the flag
(`max_streams` -> `--max-streams`) and the environment variable
(`HIDDENSTATE_MAX_STREAMS`); from the field's type and the `Setting`, the
parsing and the range and choice checks. `pipeline/config.py` declares the
sections and the checks that involve several settings.
"""

from __future__ import annotations

import argparse
import math
import typing
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

ENV_PREFIX = "HIDDENSTATE_"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class Setting:
    """How one config field is checked and documented (the field's metadata)."""

    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    required: bool = False
    secret: bool = False
    derived: str | None = None  # what an empty value means, e.g. "<input_topic>.dead-letter"


def setting(default: Any, help: str, **checks: Any) -> Any:
    """A dataclass field that is a setting: `max_streams: int = setting(100_000, "...", minimum=1)`."""
    return field(default=default, metadata={"setting": Setting(help=help, **checks)})


def flag_name(name: str) -> str:
    """`max_streams` -> `--max-streams`."""
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    """`max_streams` -> `HIDDENSTATE_MAX_STREAMS`."""
    return ENV_PREFIX + name.upper()


def who(name: str) -> str:
    """`--max-streams / HIDDENSTATE_MAX_STREAMS`: how every message names a setting."""
    return f"{flag_name(name)} / {env_name(name)}"


class Entry(NamedTuple):
    """One setting of a section: where it lives, its checks, its type and default."""

    section: str
    name: str
    setting: Setting
    kind: type
    default: Any


def entries(sections: Mapping[str, type]) -> Iterator[Entry]:
    """Every setting of every section dataclass, in declaration order."""
    for section_name, cls in sections.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            yield Entry(section_name, f.name, f.metadata["setting"], hints[f.name], f.default)


def parse_value(raw: Any, kind: type, spec: Setting) -> Any:
    """Turn a flag or environment string into the field's type and check it.

    Raises ValueError saying what is allowed (the caller adds who and what arrived).
    """
    value: Any
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError("expected true or false (1/0, yes/no, on/off)")
    text = str(raw).strip()
    if kind is int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"expected an integer{_range(spec)}") from None
    elif kind is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"expected a number{_range(spec)}") from None
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number{_range(spec)}")
    else:
        value = text
    if spec.choices is not None and value not in spec.choices:
        # Accept `info` for `INFO`, `sasl_ssl` for `SASL_SSL`: case is not a real choice.
        folded = {c.lower(): c for c in spec.choices}
        if value.lower() in folded:
            return folded[value.lower()]
        raise ValueError(f"expected one of {', '.join(repr(c) for c in spec.choices)}")
    if spec.minimum is not None and value < spec.minimum:
        raise ValueError(f"expected{_range(spec)}")
    if spec.maximum is not None and value > spec.maximum:
        raise ValueError(f"expected{_range(spec)}")
    return value


def _range(spec: Setting) -> str:
    parts = []
    if spec.minimum is not None:
        parts.append(f">= {spec.minimum:g}")
    if spec.maximum is not None:
        parts.append(f"<= {spec.maximum:g}")
    return " " + " and ".join(parts) if parts else ""


def add_flags(
    parser: argparse.ArgumentParser,
    sections: Mapping[str, type],
    only: Collection[str] | None = None,
) -> None:
    """One flag per setting (of those named in `only`, when given), grouped by section;
    every flag defaults to None ("not given")."""
    groups: dict[str, Any] = {}
    for entry in entries(sections):
        if only is not None and entry.name not in only:
            continue
        if entry.section not in groups:
            groups[entry.section] = parser.add_argument_group(f"{entry.section} settings")
        spec = entry.setting
        where = f"env {env_name(entry.name)}"
        if spec.secret:
            where += "; prefer the environment variable for this secret"
        default = spec.derived or entry.default
        shown = "required" if spec.required else f"default {default!r}"
        help_text = f"{spec.help} [{where}; {shown}]".replace("%", "%%")
        if entry.kind is bool:
            groups[entry.section].add_argument(
                flag_name(entry.name),
                dest=entry.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            groups[entry.section].add_argument(
                flag_name(entry.name),
                dest=entry.name,
                default=None,
                metavar=_metavar(spec, entry.kind),
                help=help_text,
            )


def _metavar(spec: Setting, kind: type) -> str:
    if spec.choices:
        return "{" + ",".join(c for c in spec.choices if c) + "}"
    return {int: "N", float: "X", str: "TEXT"}.get(kind, "VALUE")


def rows(sections: Mapping[str, type]) -> list[dict[str, str]]:
    """The settings as rows of flag, env, default and help: for docs."""
    table = []
    for entry in entries(sections):
        spec = entry.setting
        if spec.required:
            shown = "(required)"
        elif spec.derived and entry.default == "":
            shown = spec.derived
        else:
            shown = "(none)" if entry.default == "" else str(entry.default)
        help_text = spec.help
        if spec.choices:
            allowed = "|".join(c for c in spec.choices if c)
            empty = ", or empty" if "" in spec.choices else ""
            help_text += f" ({allowed}{empty})"
        if spec.secret:
            help_text += "; secret: masked in logs, prefer the environment variable"
        table.append(
            {
                "flag": flag_name(entry.name),
                "env": env_name(entry.name),
                "default": shown,
                "help": help_text,
            }
        )
    return table


def markdown(sections: Mapping[str, type]) -> str:
    """The settings table as Markdown."""
    lines = ["| flag | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for row in rows(sections):
        default = row["default"]
        shown = default if default.startswith("(") else f"`{default}`"
        meaning = row["help"].replace("|", "\\|")
        lines.append(f"| `{row['flag']}` | `{row['env']}` | {shown} | {meaning} |")
    return "\n".join(lines)
