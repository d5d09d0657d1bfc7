from pathlib import Path

import numpy as np
import onnx
import pytest

from pipeline import runtime
from pipeline.config import RuntimeConfig
from pipeline.errors import ConfigError, ModelContractError
from pipeline.runtime import OrtStepModel
from pipeline.testing import NumpyStepModel, StepWeights, random_weights, write_onnx_step


def random_inputs(weights: StepWeights, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    spec = weights.spec
    if spec.input.dtype == "int64":
        x = rng.integers(0, len(spec.input.vocabulary or ()), size=(batch, 1)).astype(np.int64)
    else:
        x = rng.normal(size=(batch, len(spec.input.features))).astype(np.float32)
    states = [rng.normal(size=(batch, *s.shape)).astype(np.float32) for s in spec.states]
    return x, states


def assert_same_step(a, b, atol=1e-5):
    (out_a, states_a), (out_b, states_b) = a, b
    assert out_a.keys() == out_b.keys()
    for name in out_a:
        np.testing.assert_allclose(out_a[name], out_b[name], atol=atol)
    for sa, sb in zip(states_a, states_b, strict=True):
        np.testing.assert_allclose(sa, sb, atol=atol)


def edited(source: Path, target: Path, edit) -> Path:
    model = onnx.load(str(source))
    edit(model)
    onnx.save(model, str(target))
    return target


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("task", ["regression", "classification", "next_token"])
def test_onnx_step_equals_the_numpy_reference(cell, layers, task, tmp_path):
    weights = random_weights(
        cell, layers=layers, task=task, hidden=6, n_features=4, n_outputs=3, seed=3
    )
    model = OrtStepModel(write_onnx_step(weights, tmp_path / "m.onnx"))
    x, states = random_inputs(weights, batch=5)
    assert_same_step(model.step(x, states), NumpyStepModel(weights).step(x, states))


def test_the_spec_comes_from_the_file_metadata(ort_gru, gru_weights):
    assert ort_gru.spec == gru_weights.spec


def test_step_does_not_mutate_its_inputs(ort_gru, gru_weights):
    x, states = random_inputs(gru_weights, batch=4)
    x_before, states_before = x.copy(), [s.copy() for s in states]
    ort_gru.step(x, states)
    np.testing.assert_array_equal(x, x_before)
    for s, before in zip(states, states_before, strict=True):
        np.testing.assert_array_equal(s, before)


def test_a_row_gives_the_same_result_alone_or_in_a_batch(ort_gru, gru_weights):
    x, states = random_inputs(gru_weights, batch=6)
    batched, _ = ort_gru.step(x, states)
    alone, _ = ort_gru.step(x[3:4], [s[3:4] for s in states])
    np.testing.assert_allclose(batched["y"][3:4], alone["y"], atol=1e-6)


def test_step_with_the_wrong_number_of_states_says_which_it_needs(ort_gru, gru_weights):
    x, _ = random_inputs(gru_weights, batch=1)
    with pytest.raises(ValueError, match=r"needs 1 state arrays \(h\), got 0"):
        ort_gru.step(x, [])


def test_a_missing_file_is_a_config_error_naming_the_setting(tmp_path):
    with pytest.raises(
        ConfigError, match=r"--model / HIDDENSTATE_MODEL: .*missing\.onnx' does not exist"
    ):
        OrtStepModel(tmp_path / "missing.onnx")


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        OrtStepModel(tmp_path)


def test_an_empty_file_is_refused(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelContractError, match="the file is empty"):
        OrtStepModel(tmp_path / "empty.onnx")


def test_a_file_that_is_not_onnx_is_a_contract_error_naming_it(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("certainly not protobuf")
    with pytest.raises(ModelContractError, match=r"notes\.onnx: onnxruntime cannot load this file"):
        OrtStepModel(path)


def test_an_onnx_file_without_hiddenstate_metadata_is_refused(gru_onnx, tmp_path):
    path = edited(gru_onnx, tmp_path / "bare.onnx", lambda m: m.ClearField("metadata_props"))
    with pytest.raises(ModelContractError, match="not made by `hiddenstate export`"):
        OrtStepModel(path)


def test_graph_inputs_must_be_those_of_the_metadata(tmp_path):
    weights = random_weights("gru")
    spec = weights.spec
    states = (type(spec.states[0])(name="hidden", output="hidden_out", shape=spec.states[0].shape),)
    mismatched = type(spec)(**{**spec.__dict__, "states": states})
    path = write_onnx_step(weights, tmp_path / "m.onnx")
    path = edited(path, path, lambda m: onnx.helper.set_model_props(m, mismatched.to_metadata()))
    with pytest.raises(
        ModelContractError, match=r"graph inputs are \['h', 'x'\].*missing \['hidden'\]"
    ):
        OrtStepModel(path)


def test_a_fixed_batch_axis_is_refused(gru_onnx, tmp_path):
    def fix_batch(model):
        model.graph.input[1].type.tensor_type.shape.dim[0].dim_value = 1

    with pytest.raises(ModelContractError, match=r"axis 0 \(batch\) of 'h' is fixed at 1"):
        OrtStepModel(edited(gru_onnx, tmp_path / "fixed.onnx", fix_batch))


def test_a_wrong_feature_count_in_the_graph_is_refused(gru_onnx, tmp_path):
    def widen(model):
        model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 5

    with pytest.raises(ModelContractError, match="axis 1 of 'x' is 5, the metadata says 3"):
        OrtStepModel(edited(gru_onnx, tmp_path / "wide.onnx", widen))


def test_token_metadata_on_a_float_graph_is_refused(gru_onnx, gru_weights, tmp_path):
    spec = gru_weights.spec
    tokens = type(spec.input)(features=("token",), dtype="int64", vocabulary=("a", "b"))
    lying = type(spec)(**{**spec.__dict__, "input": tokens})
    path = edited(
        gru_onnx,
        tmp_path / "lying.onnx",
        lambda m: onnx.helper.set_model_props(m, lying.to_metadata()),
    )
    with pytest.raises(
        ModelContractError,
        match=r"tensor 'x' is tensor\(float\), the step contract needs tensor\(int64\)",
    ):
        OrtStepModel(path)


def test_an_output_shape_unlike_the_metadata_fails_at_load(gru_onnx, gru_weights, tmp_path):
    spec = gru_weights.spec
    outputs = (type(spec.outputs[0])(name="y", shape=(4,), meaning="wrong"),)
    lying = type(spec)(**{**spec.__dict__, "outputs": outputs})

    def edit(model):
        onnx.helper.set_model_props(model, lying.to_metadata())
        model.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "n"

    # Declared or inferred by onnxruntime, the real size 2 is found at load, not while serving.
    with pytest.raises(ModelContractError, match=r"'y' .*2.*the metadata says \[?(2, )?4"):
        OrtStepModel(edited(gru_onnx, tmp_path / "y4.onnx", edit))


def test_cpu_runs_on_the_cpu_provider_without_fallback(ort_gru):
    assert (ort_gru.device, ort_gru.provider, ort_gru.fallback) == (
        "cpu",
        "CPUExecutionProvider",
        False,
    )


@pytest.mark.skipif(runtime.CUDA in runtime.available_providers(), reason="this machine has CUDA")
def test_cuda_without_the_cuda_provider_is_a_clear_error(gru_onnx):
    with pytest.raises(
        ConfigError,
        match=r"--device / HIDDENSTATE_DEVICE: cuda requested, but this onnxruntime has no "
        r"CUDAExecutionProvider.*install onnxruntime-gpu",
    ):
        OrtStepModel(gru_onnx, device="cuda")


@pytest.mark.skipif(runtime.CUDA in runtime.available_providers(), reason="this machine has CUDA")
def test_auto_without_cuda_runs_on_cpu_and_flags_the_fallback(gru_onnx):
    model = OrtStepModel(gru_onnx, device="auto")
    assert (model.requested_device, model.device, model.fallback) == ("auto", "cpu", True)


def test_cuda_that_does_not_initialise_is_an_error_not_a_silent_cpu(gru_onnx, monkeypatch):
    # The provider is listed, but the session comes up without it (missing CUDA libraries).
    monkeypatch.setattr(runtime, "available_providers", lambda: [runtime.CUDA, runtime.CPU])
    monkeypatch.setattr(runtime, "_providers_for", lambda device, device_id: [runtime.CPU])
    with pytest.raises(ConfigError, match="CUDAExecutionProvider did not initialise"):
        OrtStepModel(gru_onnx, device="cuda")


def test_auto_with_cuda_that_does_not_initialise_falls_back(gru_onnx, monkeypatch):
    monkeypatch.setattr(runtime, "_providers_for", lambda device, device_id: [runtime.CPU])
    model = OrtStepModel(gru_onnx, device="auto")
    assert (model.device, model.fallback) == ("cpu", True)


def test_the_runtime_section_of_the_config_loads_the_model(gru_onnx, ort_gru, gru_weights):
    config = RuntimeConfig(
        model=str(gru_onnx), intra_op_threads=2, inter_op_threads=1, spinning=True
    )
    model = OrtStepModel.from_config(config)
    x, states = random_inputs(gru_weights, batch=3)
    assert_same_step(model.step(x, states), ort_gru.step(x, states), atol=1e-6)


@pytest.mark.cuda
def test_cuda_step_equals_the_numpy_reference(gru_onnx, gru_weights):
    model = OrtStepModel(gru_onnx, device="cuda")
    assert model.provider == runtime.CUDA
    x, states = random_inputs(gru_weights, batch=64)
    assert_same_step(model.step(x, states), NumpyStepModel(gru_weights).step(x, states), atol=1e-4)


@pytest.fixture(params=["numpy", "onnxruntime"])
def any_step_model(request, gru_weights, ort_gru):
    return NumpyStepModel(gru_weights) if request.param == "numpy" else ort_gru


def test_every_step_model_keeps_the_contract(any_step_model, gru_weights):
    # The StepModel contract, for the double and the real runtime alike: shapes as the
    # spec says, inputs untouched, each row independent of the others.
    spec = any_step_model.spec
    x, states = random_inputs(gru_weights, batch=4, seed=5)
    before = [x.copy(), *(s.copy() for s in states)]
    outputs, new_states = any_step_model.step(x, states)
    assert {k: v.shape for k, v in outputs.items()} == {o.name: (4, *o.shape) for o in spec.outputs}
    assert [s.shape for s in new_states] == [(4, *s.shape) for s in spec.states]
    assert all(a.dtype == np.float32 for a in [*outputs.values(), *new_states])
    for array, copy in zip([x, *states], before, strict=True):
        np.testing.assert_array_equal(array, copy)
    row, _ = any_step_model.step(x[2:3], [s[2:3] for s in states])
    np.testing.assert_allclose(row["y"], outputs["y"][2:3], atol=1e-6)
