"""The serving side stands without torch and without the offline package."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pipeline

PIPELINE = Path(pipeline.__file__).parent


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_pipeline_module_imports_torch_or_export():
    offenders = {
        str(path.relative_to(PIPELINE)): sorted(imported_roots(path) & {"torch", "export"})
        for path in PIPELINE.rglob("*.py")
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_every_pipeline_module_imports_with_torch_blocked():
    modules = [f"pipeline.{m.name}" for m in pkgutil.iter_modules([str(PIPELINE)])]
    code = (
        "import sys, importlib\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['export'] = None\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
