"""Where the development servers keep their files, and small process helpers they share.

A server's folder (jars, data, log, pid file) is, in this order:

1. the environment variable that names it (`HIDDENSTATE_KAFKA_HOME`, ...);
2. in a checkout of this repository, `.<name>/` at its root (git ignores it);
3. otherwise (a wheel installed anywhere), the user's data folder, e.g.
   `~/.local/share/hiddenstate/<name>` on Linux (`$XDG_DATA_HOME` moves it),
   from platformdirs, which knows each platform's convention. Never inside
   site-packages.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import platformdirs

_REPO_ROOT = Path(__file__).resolve().parents[2]


def in_checkout() -> bool:
    """True when this package runs from a checkout of the repository (not a wheel)."""
    return (_REPO_ROOT / "pyproject.toml").is_file() and (_REPO_ROOT / ".git").exists()


def default_home(name: str, variable: str) -> Path:
    """The folder of the development server `name` (see the module docstring)."""
    given = os.environ.get(variable)
    if given:
        return Path(given).resolve()
    if in_checkout():
        return _REPO_ROOT / f".{name}"
    return platformdirs.user_data_path("hiddenstate") / name


def port_open(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:`port`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int) -> bool:
    """True while process `pid` runs (a zombie has exited: only its parent has not reaped it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def log_tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log written)"
