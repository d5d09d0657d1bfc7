"""The images (docker/Dockerfile, docker/Dockerfile.cuda, docker/Dockerfile.model) and
.dockerignore, read as text: what they copy exists and is in the build context, they run
as a non-root user, set only settings the server reads, expose its port, probe its health,
install the right onnxruntime (and the CUDA 12 build argument set a CUDA 12 one), and the
model image holds the model where the pod copies it from. No image is built here (no
Docker engine): docs/operations.md#what-was-exercised."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.runtime import OrtStepModel
from tests.unit.deploy.dockerfiles import (
    Dockerfile,
    copy_sources,
    env_names,
    ignored,
    parse,
    read_ignore,
)
from tests.unit.deploy.tools import REPO

IMAGES = ("Dockerfile", "Dockerfile.cuda")
MODEL_IMAGE = REPO / "docker" / "Dockerfile.model"
CUDA12_ARGS = REPO / "docker" / "cuda12.args"
# The newest onnxruntime-gpu whose wheel asks for CUDA 12 libraries (1.27.0 on: CUDA 13),
# from the wheels' metadata: pip install --dry-run --ignore-installed --no-deps --report -
# 'onnxruntime-gpu[cuda]==<version>' lists nvidia-cuda-runtime-cu12 or -cu13 under requires_dist.
LAST_ORT_FOR_CUDA12 = (1, 26, 0)


@pytest.fixture(params=IMAGES)
def dockerfile(request: pytest.FixtureRequest) -> Dockerfile:
    """Each image's Dockerfile, parsed."""
    return parse(REPO / "docker" / request.param)


def _runtime(dockerfile: Dockerfile) -> tuple[dict[str, str], dict[str, str]]:
    runtime = dockerfile.stage("runtime")
    envs = {k: runtime.expand(v, dockerfile.global_args) for k, v in env_names(runtime).items()}
    return envs, runtime.args


def _context_files(source: str) -> list[str]:
    path = REPO / source
    if path.is_dir():
        return [str(p.relative_to(REPO)) for p in path.rglob("*") if p.is_file()]
    return [source]


def test_every_path_the_images_copy_exists_in_the_repository(dockerfile: Dockerfile) -> None:
    sources = [
        source
        for stage in dockerfile.stages
        for source in copy_sources(stage, dockerfile.global_args)
    ]
    assert "pipeline/" in sources
    assert [s for s in sources if not (REPO / s).exists()] == []


def test_every_path_the_images_copy_is_in_the_build_context(dockerfile: Dockerfile) -> None:
    patterns = read_ignore(REPO / ".dockerignore")
    copied = [
        file
        for stage in dockerfile.stages
        for source in copy_sources(stage, dockerfile.global_args)
        for file in _context_files(source)
        if "__pycache__" not in file
    ]
    assert [f for f in copied if ignored(f, patterns)] == []


def test_the_build_context_leaves_out_the_venv_the_broker_and_the_offline_side() -> None:
    patterns = read_ignore(REPO / ".dockerignore")
    for path in (".venv/bin/python", ".kafka/libs/kafka.jar", "export/train.py", ".git/HEAD"):
        assert ignored(path, patterns), path
    assert ignored("artifacts/gru/curves.png", patterns)
    assert not ignored("artifacts/gru/model.onnx", patterns)


def test_the_runtime_stage_is_the_default_target_of_a_multi_stage_build(
    dockerfile: Dockerfile,
) -> None:
    assert dockerfile.stages[-1].name == "runtime"
    assert dockerfile.stages[0].name == "build"
    runtime = dockerfile.stage("runtime")
    assert not any("pip install" in rest for rest in runtime.all("RUN"))
    assert "--from=build /opt/hiddenstate /opt/hiddenstate" in runtime.all("COPY")


def test_the_images_run_as_an_unprivileged_user(dockerfile: Dockerfile) -> None:
    user = dockerfile.stage("runtime").all("USER")[-1]
    uid = user.split(":")[0]
    assert uid.isdigit(), user
    assert int(uid) >= 1000, user


def test_the_images_set_only_settings_the_server_reads(
    dockerfile: Dockerfile, settings_defaults: dict[str, str]
) -> None:
    envs, _ = _runtime(dockerfile)
    settings = {name for name in envs if name.startswith("HIDDENSTATE_")}
    assert settings <= set(settings_defaults)
    assert "HIDDENSTATE_MODEL" in settings


def test_the_images_expose_the_default_metrics_port(
    dockerfile: Dockerfile, settings_defaults: dict[str, str]
) -> None:
    envs, _ = _runtime(dockerfile)
    exposed = dockerfile.stage("runtime").all("EXPOSE")
    assert exposed == [settings_defaults["HIDDENSTATE_METRICS_PORT"]]
    assert envs["HIDDENSTATE_METRICS_PORT"] == settings_defaults["HIDDENSTATE_METRICS_PORT"]


def test_the_image_healthcheck_asks_healthz_on_the_metrics_port(dockerfile: Dockerfile) -> None:
    (healthcheck,) = dockerfile.stage("runtime").all("HEALTHCHECK")
    assert "/healthz" in healthcheck
    assert "HIDDENSTATE_METRICS_PORT" in healthcheck


def test_the_model_is_read_from_the_models_folder_the_build_argument_fills(
    dockerfile: Dockerfile,
) -> None:
    envs, args = _runtime(dockerfile)
    assert f"{args['MODEL_DIR']}/ /models/" in [
        dockerfile.stage("runtime").expand(c, dockerfile.global_args)
        for c in dockerfile.stage("runtime").all("COPY")
    ]
    assert envs["HIDDENSTATE_MODEL"] == f"/models/{args['MODEL_FILE']}"
    assert (REPO / args["MODEL_DIR"]).is_dir()


def test_the_cpu_image_installs_neither_torch_nor_the_export_extra_nor_onnxruntime_gpu() -> None:
    dockerfile = parse(REPO / "docker" / "Dockerfile")
    build = dockerfile.stage("build")
    installs = " ".join(build.all("RUN"))
    assert "pip install -c constraints.txt '.[fast,registry]'" in installs
    for unwanted in ("torch", "[export", "onnxruntime-gpu"):
        assert unwanted not in installs
    assert "export/" not in copy_sources(build, dockerfile.global_args)
    assert dockerfile.global_args["PYTHON_IMAGE"].endswith("-slim-bookworm")


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_both_images_install_the_fast_path_the_readme_measures(name: str) -> None:
    build = parse(REPO / "docker" / name).stage("build")
    installs = " ".join(build.all("RUN"))
    (extras,) = re.findall(r"pip install -c constraints.txt '\.\[([a-z,]+)\]'", installs)
    assert {"fast", "registry"} <= set(extras.split(","))


def test_the_cuda_image_installs_onnxruntime_gpu_instead_of_onnxruntime() -> None:
    dockerfile = parse(REPO / "docker" / "Dockerfile.cuda")
    build = dockerfile.stage("build")
    (install,) = [rest for rest in build.all("RUN") if "pip install" in rest]
    steps = [step.strip() for step in install.split("&&")]
    commands = [shlex.split(build.expand(step, dockerfile.global_args)) for step in steps]
    uninstall = commands.index(["/opt/hiddenstate/bin/pip", "uninstall", "-y", "onnxruntime"])
    gpu = next(i for i, c in enumerate(commands) if any("onnxruntime-gpu==" in w for w in c))
    assert 0 < uninstall < gpu
    assert re.fullmatch(r"\d+\.\d+\.\d+", build.args["ORT_GPU_VERSION"])
    envs, _ = _runtime(dockerfile)
    assert envs["HIDDENSTATE_DEVICE"] == "cuda"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _cuda12_args() -> dict[str, str]:
    lines = [line for line in CUDA12_ARGS.read_text().splitlines() if re.match(r"^[A-Z]", line)]
    return dict(line.split("=", 1) for line in lines)


def test_the_cuda_12_argument_set_names_only_arguments_of_the_cuda_image() -> None:
    dockerfile = parse(REPO / "docker" / "Dockerfile.cuda")
    declared = set(dockerfile.global_args) | set(dockerfile.stage("build").args)
    assert set(_cuda12_args()) == {"CUDA_IMAGE", "ORT_GPU_VERSION"}
    assert set(_cuda12_args()) <= declared


def test_the_cuda_12_set_pairs_a_cuda_12_base_with_an_onnxruntime_built_for_cuda_12() -> None:
    args = _cuda12_args()
    dockerfile = parse(REPO / "docker" / "Dockerfile.cuda")
    default_ort = dockerfile.stage("build").args["ORT_GPU_VERSION"]
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:12.")
    assert "cudnn-runtime" in args["CUDA_IMAGE"]
    assert _version(args["ORT_GPU_VERSION"]) <= LAST_ORT_FOR_CUDA12 < _version(default_ort)
    assert dockerfile.global_args["CUDA_IMAGE"].startswith("nvidia/cuda:13.")


def test_the_model_image_holds_the_model_and_a_static_busybox_in_an_empty_image() -> None:
    dockerfile = parse(MODEL_IMAGE)
    for name in ("demo", "model"):
        stage = dockerfile.stage(name)
        copies = [shlex.split(stage.expand(c, dockerfile.global_args)) for c in stage.all("COPY")]
        assert stage.base == "scratch", name
        assert ["--from=busybox", "/bin/busybox", "/bin/busybox"] in copies, name
        assert [c[-1] for c in copies if c[-2].endswith(".onnx")] == ["/model.onnx"], name
        uid = stage.all("USER")[-1].split(":")[0]
        assert int(uid) >= 1000, name
    busybox = dockerfile.stage("busybox").expand(
        dockerfile.stage("busybox").base, dockerfile.global_args
    )
    assert busybox.endswith("-musl")  # the statically linked build


def test_the_model_image_defaults_to_the_export_make_demo_writes() -> None:
    dockerfile = parse(MODEL_IMAGE)
    model = Path(dockerfile.stage("model").args["MODEL"])
    demo = (REPO / "scripts" / "demo.sh").read_text()
    (folder,) = re.findall(r"^MODEL=(\S+)$", demo, flags=re.MULTILINE)
    assert model == Path(folder) / "model.onnx"
    assert dockerfile.stages[-1].name == "model"  # the default target


def test_the_model_image_copies_only_what_the_build_context_lets_in() -> None:
    dockerfile = parse(MODEL_IMAGE)
    patterns = read_ignore(REPO / ".dockerignore")
    sources = [
        s for stage in dockerfile.stages for s in copy_sources(stage, dockerfile.global_args)
    ]
    assert "artifacts/gru-vowels/model.onnx" in sources
    assert [s for s in sources if ignored(s, patterns)] == []
    assert [s for s in sources if not s.startswith("artifacts/") and not (REPO / s).exists()] == []


def test_the_demo_model_stage_writes_a_model_of_eight_features(tmp_path: Path) -> None:
    """Runs the demo stage's model-writing command here, then loads what it wrote."""
    (command,) = parse(MODEL_IMAGE).stage("demo-build").all("RUN")
    script = shlex.split(command.split("&&")[-1])[-1].replace(
        "/demo/model.onnx", str(tmp_path / "m.onnx")
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO)
    model = OrtStepModel(tmp_path / "m.onnx")
    assert (len(model.spec.input.features), model.spec.cell) == (8, "gru")
