import json

import pytest

from pipeline.errors import ModelContractError
from pipeline.model_spec import InputSpec, ModelSpec, Normalization, OutputSpec, Parity, StateSpec


def make_spec(**overrides):
    fields = dict(
        name="gru-test",
        version="3",
        task="regression",
        cell="gru",
        weights_sha256="ab" * 32,
        input=InputSpec(features=("a", "b")),
        states=(StateSpec(name="h", output="h_out", shape=(2, 8)),),
        outputs=(OutputSpec(name="y", shape=(2,), meaning="next a and b", labels=("a", "b")),),
        normalization=Normalization(mean=(0.0, 1.0), std=(1.0, 2.0)),
        parity=Parity(max_abs_error=1e-7, tolerance=1e-5, sequences=37, max_steps=20),
        export={"exporter": "dynamo"},
    )
    fields.update(overrides)
    return ModelSpec(**fields)


def test_metadata_round_trips_to_an_equal_spec():
    spec = make_spec()
    assert ModelSpec.from_metadata(spec.to_metadata()) == spec


def test_every_metadata_value_is_a_json_string():
    for value in make_spec().to_metadata().values():
        json.loads(value)


def test_identity_names_model_version_and_weights():
    assert make_spec().identity == "gru-test@3#abababababababab"


def test_state_bytes_counts_float32_elements():
    spec = make_spec(states=(StateSpec("h", "h_out", (2, 8)), StateSpec("c", "c_out", (2, 8))))
    assert spec.state_bytes == 2 * 2 * 8 * 4


def test_file_without_hiddenstate_metadata_is_refused_with_a_hint():
    with pytest.raises(ModelContractError, match="not made by `hiddenstate export`"):
        ModelSpec.from_metadata({"producer": "somebody"}, source="m.onnx")


def test_unknown_task_is_refused():
    with pytest.raises(ModelContractError, match="task 'ranking'"):
        make_spec(task="ranking")


def test_token_input_without_vocabulary_is_refused():
    with pytest.raises(ModelContractError, match="vocabulary"):
        make_spec(input=InputSpec(features=("token",), dtype="int64"))


def test_tensor_name_used_twice_is_refused():
    with pytest.raises(ModelContractError, match="used twice: h"):
        make_spec(outputs=(OutputSpec(name="h", shape=(1,), meaning="oops"),))


def test_malformed_metadata_names_the_file():
    props = make_spec().to_metadata()
    props["hiddenstate.states"] = json.dumps([{"name": "h"}])
    with pytest.raises(ModelContractError, match=r"m\.onnx: hiddenstate metadata is incomplete"):
        ModelSpec.from_metadata(props, source="m.onnx")


def test_newer_contract_version_is_refused():
    props = make_spec().to_metadata()
    props["hiddenstate.contract"] = "2"
    with pytest.raises(ModelContractError, match="contract version 2"):
        ModelSpec.from_metadata(props)
