"""The programs the deployment tests run, found or failed for clearly (never skipped).

- `promtool` and `prometheus`: Debian's `prometheus` package (`make setup` installs it
  when run as root; `.ci/run` does too);
- `kustomize`, `kubeconform`, `kube-score`: built from the Go module proxy by `make tools`
  (`go install <module>@<version>` into `.tools/` at the repository root; the versions are
  the Makefile's).

Looked up in the repository's `.tools/`, next to the running Python (the virtual
environment's `bin`), then on PATH, then in Go's install folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

_HOW_TO_INSTALL = {
    "promtool": "apt-get install -y prometheus (Debian's package ships promtool), or run make setup",
    "prometheus": "apt-get install -y prometheus (Debian's package), or run make setup",
    "kustomize": "make tools (go install sigs.k8s.io/kustomize/kustomize/v5 into .tools/)",
    "kubeconform": "make tools (go install github.com/yannh/kubeconform/cmd/kubeconform into .tools/)",
    "kube-score": "make tools (go install github.com/zegl/kube-score/cmd/kube-score into .tools/)",
}


def _go_bin() -> Path | None:
    gobin = os.environ.get("GOBIN")
    if gobin:
        return Path(gobin)
    go = shutil.which("go")
    if go is None:
        return None
    gopath = subprocess.run(
        [go, "env", "GOPATH"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return Path(gopath.split(os.pathsep)[0]) / "bin" if gopath else None


def require(name: str) -> str:
    """The path of program `name`; fails the test, saying how to install it, when absent."""
    for folder in (REPO / ".tools", Path(sys.executable).parent):
        if (folder / name).is_file() and os.access(folder / name, os.X_OK):
            return str(folder / name)
    on_path = shutil.which(name)
    if on_path:
        return on_path
    go_bin = _go_bin()
    if go_bin is not None and (go_bin / name).is_file():
        return str(go_bin / name)
    pytest.fail(
        f"{name} is needed by this test and was not found; install it: {_HOW_TO_INSTALL[name]}"
    )
