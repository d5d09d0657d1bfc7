"""The model runtime: one exported step graph, run by onnxruntime.

`StepModel` is the seam between the core and whatever computes a step: the
onnxruntime session here (`OrtStepModel`), or a numpy double in
`pipeline.testing`. Loading checks the file against the step contract
(docs/step-contract.md) once, at start, so that a bad file fails there with a
message naming the file and the tensor, and never in the middle of serving.

Device choice (`--device`):

    cpu    CPUExecutionProvider
    cuda   CUDAExecutionProvider, or a ConfigError at start when it is missing
    auto   CUDA when onnxruntime has it and it initialises, else CPU; `fallback`
           is then True so that a metric (hiddenstate_device_fallback) shows it
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from pipeline.config import RuntimeConfig
from pipeline.errors import ConfigError, ModelContractError
from pipeline.model_spec import ModelSpec
from pipeline.settings import who

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)"}
_NP_TYPES = {"float32": np.float32, "int64": np.int64}
_MODEL_SETTING = who("model")
_DEVICE_SETTING = who("device")

Outputs = dict[str, NDArray[np.float32]]
States = list[NDArray[np.float32]]


class StepModel(Protocol):
    """Computes one recurrent step for a batch of streams.

    Contract: `step(x, states)` takes `x` `[batch, n_features]` (dtype of
    `spec.input`) and one float32 array per entry of `spec.states`, each
    `[batch, *state.shape]`; it returns the predictions by output name
    (`[batch, *output.shape]`) and the new states in `spec.states` order.
    It is pure: no input is mutated and row `i` of the result depends on row
    `i` of the inputs only, so any batch size >= 1 gives the same rows.
    """

    @property
    def spec(self) -> ModelSpec:
        """The contract metadata of the model."""
        ...

    def step(
        self, x: NDArray[Any], states: Sequence[NDArray[np.float32]]
    ) -> tuple[Outputs, States]:
        """Advance every row of the batch by one step."""
        ...


class OrtStepModel:
    """An exported step graph in an onnxruntime session, checked against its `ModelSpec`.

    Attributes for logs and the `hiddenstate_model_info` metric: `requested_device`
    (`cpu`/`cuda`/`auto`), `device` (`cpu`/`cuda`, what runs), `provider` (the
    first execution provider of the session) and `fallback` (auto found no CUDA).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str = "cpu",
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        spinning: bool = False,
        cuda_device_id: int = 0,
    ) -> None:
        self.path = str(path)
        self.requested_device = device
        _check_file(self.path)
        options = _session_options(intra_op_threads, inter_op_threads, spinning)
        providers = _providers_for(device, cuda_device_id)
        try:
            self._session = ort.InferenceSession(self.path, options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own pybind types; keep the cause
            raise ModelContractError(
                f"{self.path}: onnxruntime cannot load this file as an ONNX model ({exc}); "
                "pass the .onnx file written by `hiddenstate export`"
            ) from exc
        meta = self._session.get_modelmeta().custom_metadata_map
        self._spec = ModelSpec.from_metadata(meta, source=self.path)
        _check_graph(self._session, self._spec, self.path)
        self.provider = str(self._session.get_providers()[0])
        self.device = "cuda" if self.provider == CUDA else "cpu"
        self.fallback = device == "auto" and self.device != "cuda"
        if device == "cuda" and self.device != "cuda":
            raise ConfigError(
                f"{_DEVICE_SETTING}: cuda requested, but {CUDA} did not initialise (the session "
                f"got {self._session.get_providers()}); check the CUDA and cuDNN libraries "
                "onnxruntime-gpu needs (onnxruntime's log above says which failed), or use --device cpu"
            )
        self._x_name = self._spec.input.name
        self._x_dtype = _NP_TYPES[self._spec.input.dtype]
        self._state_names = [s.name for s in self._spec.states]
        self._prediction_names = [o.name for o in self._spec.outputs]
        self._fetch = self._prediction_names + [s.output for s in self._spec.states]
        self._warm_up()
        if self.fallback:
            log.warning(
                "device auto: %s is not available, running %s on CPU", CUDA, self._spec.identity
            )
        log.info(
            "model %s (%s, %s) loaded from %s on %s [%s]; %d intra-op / %d inter-op threads, "
            "spinning %s",
            self._spec.identity,
            self._spec.cell,
            self._spec.task,
            self.path,
            self.device,
            self.provider,
            intra_op_threads,
            inter_op_threads,
            "on" if spinning else "off",
        )

    @classmethod
    def from_config(cls, config: RuntimeConfig) -> OrtStepModel:
        """Load the model the runtime section of the serving config names."""
        return cls(
            config.model,
            device=config.device,
            intra_op_threads=config.intra_op_threads,
            inter_op_threads=config.inter_op_threads,
            spinning=config.spinning,
        )

    @property
    def spec(self) -> ModelSpec:
        """The contract metadata read from the file."""
        return self._spec

    def step(
        self, x: NDArray[Any], states: Sequence[NDArray[np.float32]]
    ) -> tuple[Outputs, States]:
        """Run the graph once for a batch; see `StepModel.step`."""
        if len(states) != len(self._state_names):
            raise ValueError(
                f"{self._spec.identity}: step needs {len(self._state_names)} state arrays "
                f"({', '.join(self._state_names)}), got {len(states)}"
            )
        # onnxruntime copies its inputs, so nothing the caller passes is mutated;
        # ascontiguousarray is a no-op for the slab gathers the processor passes.
        feed = {self._x_name: np.ascontiguousarray(x, dtype=self._x_dtype)}
        for name, state in zip(self._state_names, states, strict=True):
            feed[name] = np.ascontiguousarray(state, dtype=np.float32)
        results = self._session.run(self._fetch, feed)
        n = len(self._prediction_names)
        outputs = dict(zip(self._prediction_names, results[:n], strict=True))
        return outputs, list(results[n:])

    def _warm_up(self) -> None:
        """Run one batch of 2 zero streams: shape errors and lazy allocations happen now."""
        batch = 2
        x = np.zeros((batch, len(self._spec.input.features)), dtype=self._x_dtype)
        states = [np.zeros((batch, *s.shape), dtype=np.float32) for s in self._spec.states]
        try:
            outputs, new_states = self.step(x, states)
        except Exception as exc:
            raise ModelContractError(
                f"{self.path}: one step on a batch of {batch} zero streams failed ({exc}); "
                "the graph does not follow the step contract (docs/step-contract.md)"
            ) from exc
        expected = {o.name: (batch, *o.shape) for o in self._spec.outputs}
        expected.update({s.output: (batch, *s.shape) for s in self._spec.states})
        got = {k: v.shape for k, v in outputs.items()}
        got.update({s.output: a.shape for s, a in zip(self._spec.states, new_states, strict=True)})
        for name, shape in expected.items():
            if tuple(got[name]) != shape:
                raise ModelContractError(
                    f"{self.path}: output {name!r} has shape {list(got[name])} for a batch of "
                    f"{batch}, the metadata says {list(shape)}"
                )


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"{_MODEL_SETTING}: {path!r} does not exist")
    if os.path.isdir(path):
        raise ConfigError(f"{_MODEL_SETTING}: {path!r} is a directory; pass the .onnx file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{_MODEL_SETTING}: {path!r} is not readable by this user")
    if Path(path).stat().st_size == 0:
        raise ModelContractError(f"{path}: the file is empty; export the model again")


def _session_options(intra: int, inter: int, spinning: bool) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra
    options.inter_op_num_threads = inter
    # A step graph is tiny: a spinning thread pool burns a core between runs
    # for a few microseconds of latency (docs/runtime.md has the measurements).
    flag = "1" if spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", flag)
    options.add_session_config_entry("session.inter_op.allow_spinning", flag)
    return options


def available_providers() -> list[str]:
    """The execution providers this onnxruntime build has (a seam for tests)."""
    return list(ort.get_available_providers())


def _providers_for(device: str, cuda_device_id: int) -> list[Any]:
    available = available_providers()
    cuda = [(CUDA, {"device_id": cuda_device_id}), CPU]
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        if CUDA not in available:
            raise ConfigError(
                f"{_DEVICE_SETTING}: cuda requested, but this onnxruntime has no {CUDA} "
                f"(it has {', '.join(available)}); install onnxruntime-gpu instead of onnxruntime "
                "(`pip install 'hiddenstate[cuda]'` after `pip uninstall onnxruntime`, or use the "
                "CUDA image), or run with --device cpu or auto"
            )
        return cuda
    if device == "auto":
        return cuda if CUDA in available else [CPU]
    raise ConfigError(f"{_DEVICE_SETTING}: expected one of 'cpu', 'cuda', 'auto', got {device!r}")


def _check_graph(session: Any, spec: ModelSpec, path: str) -> None:
    """Graph inputs/outputs must be exactly those of the spec, with its dtypes and shapes."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    want_in = [spec.input.name, *(s.name for s in spec.states)]
    want_out = [*(o.name for o in spec.outputs), *(s.output for s in spec.states)]
    for kind, want, have in (("inputs", want_in, inputs), ("outputs", want_out, outputs)):
        missing = [n for n in want if n not in have]
        extra = [n for n in have if n not in want]
        if missing or extra:
            raise ModelContractError(
                f"{path}: graph {kind} are {sorted(have)}, the metadata says {want}"
                + (f"; missing {missing}" if missing else "")
                + (f"; not in the metadata {extra}" if extra else "")
            )
    expected: list[tuple[Any, str, tuple[int, ...]]] = [
        (inputs[spec.input.name], spec.input.dtype, (len(spec.input.features),))
    ]
    for s in spec.states:
        expected.append((inputs[s.name], s.dtype, s.shape))
        expected.append((outputs[s.output], s.dtype, s.shape))
    expected += [(outputs[o.name], "float32", o.shape) for o in spec.outputs]
    for arg, dtype, shape in expected:
        _check_tensor(arg, dtype, shape, path)


def _check_tensor(arg: Any, dtype: str, shape: tuple[int, ...], path: str) -> None:
    if arg.type != _ORT_TYPES[dtype]:
        raise ModelContractError(
            f"{path}: tensor {arg.name!r} is {arg.type}, the step contract needs {_ORT_TYPES[dtype]}"
        )
    dims = arg.shape
    if dims is None:  # shape unknown to onnxruntime: the warm-up run checks it
        return
    if len(dims) != 1 + len(shape):
        raise ModelContractError(
            f"{path}: tensor {arg.name!r} has shape {dims}, expected [batch, {', '.join(map(str, shape))}]"
        )
    if isinstance(dims[0], int):
        raise ModelContractError(
            f"{path}: axis 0 (batch) of {arg.name!r} is fixed at {dims[0]}; export with a dynamic "
            "batch axis so that many streams share one call"
        )
    for axis, (have, want) in enumerate(zip(dims[1:], shape, strict=True), start=1):
        if isinstance(have, int) and have != want:
            raise ModelContractError(
                f"{path}: axis {axis} of {arg.name!r} is {have}, the metadata says {want}"
            )
