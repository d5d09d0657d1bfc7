"""Just enough of a Dockerfile and .dockerignore reader for the image tests.

`parse(path)` gives the stages (name, base, instructions) with line continuations
joined, comments dropped and `ARG` defaults known; `ignored(path, patterns)` follows
.dockerignore's rules (last matching pattern wins, `!` re-includes, a pattern that
matches a folder covers what is inside it, `**` crosses folders).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Stage:
    """One `FROM ... AS name` stage and its instructions (keyword upper-cased, rest)."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)

    def all(self, keyword: str) -> list[str]:
        """The arguments of every `keyword` instruction of this stage, in order."""
        return [rest for key, rest in self.instructions if key == keyword]

    def expand(self, text: str, global_args: dict[str, str]) -> str:
        """`text` with `${ARG}` / `$ARG` replaced by the stage's or global ARG defaults."""
        values = {**global_args, **self.args}
        return re.sub(
            r"\$\{(\w+)\}|\$(\w+)",
            lambda m: values.get(m.group(1) or m.group(2), m.group(0)),
            text,
        )


@dataclass
class Dockerfile:
    """The global ARGs (before the first FROM) and the stages."""

    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        """The stage called `name`."""
        return next(s for s in self.stages if s.name == name)


def _logical_lines(text: str) -> list[str]:
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    return [line for line in lines if line]


def _arg(rest: str) -> tuple[str, str]:
    name, _, default = rest.partition("=")
    return name.strip(), default.strip()


def parse(path: Path) -> Dockerfile:
    """Read a Dockerfile into global ARGs and stages."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=words[0]))
        elif not stages:
            if keyword == "ARG":
                key, default = _arg(rest)
                global_args[key] = default
        else:
            stages[-1].instructions.append((keyword, rest))
            if keyword == "ARG":
                key, default = _arg(rest)
                stages[-1].args[key] = default or global_args.get(key, "")
    return Dockerfile(global_args, stages)


def copy_sources(stage: Stage, global_args: dict[str, str]) -> list[str]:
    """The build-context sources of the stage's COPY/ADD instructions (not `--from=`)."""
    sources: list[str] = []
    for key, rest in stage.instructions:
        if key not in ("COPY", "ADD"):
            continue
        words = shlex.split(stage.expand(rest, global_args))
        if any(w.startswith("--from=") for w in words):
            continue
        sources += [w for w in words if not w.startswith("--")][:-1]
    return sources


def env_names(stage: Stage) -> dict[str, str]:
    """`ENV` names and values of the stage (the `NAME=value ...` form)."""
    found: dict[str, str] = {}
    for rest in stage.all("ENV"):
        for word in shlex.split(rest):
            name, _, value = word.partition("=")
            found[name] = value
    return found


def _pattern(pattern: str) -> re.Pattern[str]:
    regex = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            regex += ".*"
            i += 2
        elif pattern[i] == "*":
            regex += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            regex += "[^/]"
            i += 1
        else:
            regex += re.escape(pattern[i])
            i += 1
    return re.compile(regex + "$")


def read_ignore(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore patterns as (exclude?, regex), in file order."""
    patterns = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        patterns.append((exclude, _pattern(line.lstrip("!").strip("/"))))
    return patterns


def ignored(relative: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the build context leaves out `relative` (a file path)."""
    parts = relative.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for exclude, regex in patterns:
        if any(regex.match(prefix) for prefix in prefixes):
            excluded = exclude
    return excluded
