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
    modules = [m.name for m in pkgutil.walk_packages([str(PIPELINE)], prefix="pipeline.")]
    assert "pipeline.transport.base" in modules
    code = (
        "import sys, importlib\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['export'] = None\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_transport_seam_and_the_loop_import_no_kafka_client():
    neutral = ["transport/base.py", "transport/__init__.py", "loop.py", "processor.py"]
    clients = {"kafka", "confluent_kafka"}
    found = {name: sorted(imported_roots(PIPELINE / name) & clients) for name in neutral}
    assert found == {name: [] for name in neutral}


def test_serve_imports_none_of_the_development_tools():
    code = (
        "import sys, pipeline.serve\n"
        "print(sorted(m for m in sys.modules if m.startswith('pipeline.devtools')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
