import json

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import codec
from pipeline.codec import (
    REASONS,
    REGISTRY_REASONS,
    EventDecoder,
    PredictionEncoder,
    dead_letter,
    event_schema,
    packaged_schema,
)
from pipeline.errors import BadEventError
from pipeline.model_spec import InputSpec, ModelSpec, OutputSpec, StateSpec
from pipeline.testing import event_record, random_weights

FEATURES = InputSpec(features=("a", "b", "c"))
TOKENS = InputSpec(features=("token",), dtype="int64", vocabulary=("x", "y", "z"))
FLOAT_SPEC = random_weights("gru", n_features=3).spec
TOKEN_SPEC = random_weights("gru", task="next_token", vocabulary=["x", "y", "z"]).spec


@pytest.fixture(autouse=True, params=["orjson", "stdlib"])
def json_parser(request, monkeypatch):
    """Every codec test runs with orjson and with the standard library's JSON (and `%`
    number formats): the results must not depend on which is installed."""
    if request.param == "stdlib":
        monkeypatch.setattr(codec, "FAST_JSON", None)
        monkeypatch.setattr(codec, "FAST_JSON_NUMPY", None)
    elif codec.FAST_JSON is None:
        pytest.skip("orjson (the `fast` extra) is not installed")
    return request.param


def decode(value, key="s1", spec=FEATURES, max_bytes=1000, **kwargs):
    return EventDecoder(spec, max_bytes).decode(event_record(key, value, **kwargs))


def reason_of(value, key="s1", spec=FEATURES, max_bytes=1000):
    with pytest.raises(BadEventError) as caught:
        decode(value, key=key, spec=spec, max_bytes=max_bytes)
    assert caught.value.reason in REASONS
    return caught.value.reason


def test_an_array_event_gives_features_in_model_order():
    event = decode({"x": [1.0, 2, -3.5], "ts": 1234})
    assert (event.key, event.x, event.event_time_ms, event.reset) == (
        b"s1",
        [1.0, 2, -3.5],
        1234,
        False,
    )


def test_an_object_event_is_put_in_model_order():
    assert decode({"x": {"c": 3.0, "a": 1.0, "b": 2.0}}).x == [1.0, 2.0, 3.0]


def test_without_ts_the_record_timestamp_is_the_event_time():
    assert decode({"x": [1, 2, 3]}, timestamp_ms=99).event_time_ms == 99


def test_reset_true_is_read():
    assert decode({"x": [1, 2, 3], "reset": True}).reset is True


def test_unknown_fields_are_ignored():
    assert decode({"x": [1, 2, 3], "trace_id": "abc"}).x == [1, 2, 3]


def test_a_token_event_gives_the_token_id():
    assert decode({"x": [2]}, spec=TOKENS).x == [2]


def test_a_token_id_written_as_an_integral_float_is_accepted():
    assert decode({"x": {"token": 1.0}}, spec=TOKENS).x == [1]


def test_the_record_is_kept_for_its_position():
    event = decode({"x": [1, 2, 3]}, offset=17, partition=2)
    assert event.record.where == "events[2]@17"


BAD_EVENTS = [
    ("missing_key", None, {"x": [1, 2, 3]}),
    ("missing_key", b"", {"x": [1, 2, 3]}),
    ("missing_value", "s1", None),
    ("oversized", "s1", {"x": [1, 2, 3], "pad": "p" * 2000}),
    ("undecodable", "s1", b'{"x": [1, 2, 3], "n": "\xff"}'),
    ("not_json", "s1", b'{"x": [1, 2, 3'),
    ("schema", "s1", b"[1, 2, 3]"),
    ("schema", "s1", {"features": [1, 2, 3]}),
    ("schema", "s1", {"x": "1,2,3"}),
    ("schema", "s1", {"x": [1, 2, 3], "ts": "yesterday"}),
    ("schema", "s1", {"x": [1, 2, 3], "ts": -5}),
    ("schema", "s1", {"x": [1, 2, 3], "reset": "yes"}),
    ("feature_count", "s1", {"x": [1, 2]}),
    ("feature_count", "s1", {"x": [1, 2, 3, 4]}),
    ("feature_names", "s1", {"x": {"a": 1, "b": 2}}),
    ("feature_names", "s1", {"x": {"a": 1, "b": 2, "d": 3}}),
    ("wrong_type", "s1", {"x": [1, "2", 3]}),
    ("wrong_type", "s1", {"x": [1, None, 3]}),
    ("wrong_type", "s1", {"x": [1, True, 3]}),
    ("wrong_type", "s1", {"x": [1, [2], 3]}),
    ("non_finite", "s1", b'{"x": [1, NaN, 3]}'),
    ("non_finite", "s1", b'{"x": [1, -Infinity, 3]}'),
    ("non_finite", "s1", {"x": [1, 1e39, 3]}),
]


@pytest.mark.parametrize(("reason", "key", "value"), BAD_EVENTS)
def test_each_kind_of_bad_event_has_its_reason(reason, key, value):
    assert reason_of(value, key=key) == reason


@pytest.mark.parametrize(
    ("reason", "value"),
    [
        ("token_out_of_range", {"x": [3]}),
        ("token_out_of_range", {"x": [-1]}),
        ("wrong_type", {"x": [1.5]}),
        ("wrong_type", {"x": ["y"]}),
        ("feature_count", {"x": [1, 2]}),
    ],
)
def test_each_kind_of_bad_token_event_has_its_reason(reason, value):
    assert reason_of(value, spec=TOKENS) == reason


def test_json_nested_too_deeply_to_parse_is_not_json():
    assert reason_of(b"[" * 50_000 + b"]" * 50_000, max_bytes=200_000) == "not_json"


def test_every_json_reason_label_is_tested():
    # The Schema Registry formats' own reasons are tested in tests/unit/test_formats.py.
    tested = {r for r, _, _ in BAD_EVENTS} | {"token_out_of_range"}
    assert tested == set(REASONS) - set(REGISTRY_REASONS)


def test_a_detail_says_what_was_expected_and_what_arrived():
    with pytest.raises(
        BadEventError, match=r"'x' has 2 values, the model takes 3: \['a', 'b', 'c'\]"
    ):
        decode({"x": [1, 2]})


def test_a_feature_names_detail_lists_missing_and_unknown_names():
    with pytest.raises(BadEventError, match=r"missing \['c'\], unknown \['d'\]"):
        decode({"x": {"a": 1, "b": 2, "d": 3}})


def test_a_dead_letter_keeps_the_original_bytes_and_headers_and_says_why():
    record = event_record("s1", b"{oops", offset=5, partition=2, headers=(("trace", b"t-1"),))
    with pytest.raises(BadEventError) as caught:
        EventDecoder(FEATURES, 1000).decode(record)
    letter = dead_letter(record, caught.value, "events.dead-letter")
    headers = dict(letter.headers)
    assert (letter.topic, letter.key, letter.value) == ("events.dead-letter", b"s1", b"{oops")
    assert headers["trace"] == b"t-1"
    assert headers["hiddenstate.error.reason"] == b"not_json"
    assert headers["hiddenstate.error.detail"].startswith(b"the value is not JSON")
    assert (
        headers["hiddenstate.source.topic"],
        headers["hiddenstate.source.partition"],
        headers["hiddenstate.source.offset"],
    ) == (b"events", b"2", b"5")


def encode_one(spec=FLOAT_SPEC, outputs=None, step=3, **record):
    event = decode({"x": [1, 2, 3], "ts": 1_700_000_000_123}, offset=7, partition=1, **record)
    outputs = outputs or {"y": np.array([[0.1, -2.5]], np.float32)}
    (out,) = PredictionEncoder(spec, "predictions").encode_wave(
        [event], outputs, np.array([step]), queued_seconds=0.002, inference_seconds=0.0003
    )
    return out, json.loads(out.value)


def test_a_prediction_is_keyed_by_the_stream_and_names_its_source():
    record, value = encode_one()
    assert (record.topic, record.key, record.partition) == ("predictions", b"s1", None)
    assert value["source"] == {"topic": "events", "partition": 1, "offset": 7}
    assert value["model"] == {"name": "test-gru", "version": "1"}
    assert (value["event_time_ms"], value["step"]) == (1_700_000_000_123, 3)
    assert value["latency"] == {"queued_seconds": 0.002, "inference_seconds": 0.0003}


def test_predicted_values_round_trip_float32_exactly():
    values = np.array([[0.1, 1 / 3]], np.float32)
    _, value = encode_one(outputs={"y": values})
    assert np.array(value["outputs"]["y"], np.float32).tolist() == values[0].tolist()


def test_a_non_finite_predicted_value_is_written_as_null():
    _, value = encode_one(outputs={"y": np.array([[np.nan, 1.0]], np.float32)})
    assert value["outputs"]["y"] == [None, 1.0]


def test_a_multi_axis_output_keeps_its_shape():
    spec = ModelSpec(
        name="grid",
        version="2",
        task="regression",
        cell="custom",
        weights_sha256="0" * 64,
        input=FEATURES,
        states=(StateSpec("h", "h_out", (4,)),),
        outputs=(OutputSpec("quantiles", (2, 3), "q"), OutputSpec("mean", (1,), "m")),
    )
    outputs = {
        "quantiles": np.arange(6, dtype=np.float32).reshape(1, 2, 3),
        "mean": np.ones((1, 1), np.float32),
    }
    _, value = encode_one(spec=spec, outputs=outputs)
    assert value["outputs"] == {"quantiles": [[0, 1, 2], [3, 4, 5]], "mean": [1]}


def test_a_wave_gives_one_record_per_event_in_order():
    events = [decode({"x": [i, i, i]}, key=f"s{i}") for i in range(3)]
    outputs = {"y": np.arange(6, dtype=np.float32).reshape(3, 2)}
    records = PredictionEncoder(FLOAT_SPEC, "p").encode_wave(
        events, outputs, np.array([1, 5, 2]), 0.0, 0.0
    )
    assert [r.key for r in records] == [b"s0", b"s1", b"s2"]
    assert [json.loads(r.value)["outputs"]["y"] for r in records] == [[0, 1], [2, 3], [4, 5]]
    assert [json.loads(r.value)["step"] for r in records] == [1, 5, 2]


def test_predictions_follow_the_packaged_prediction_schema():
    _, value = encode_one(outputs={"y": np.array([[np.inf, 1e-30]], np.float32)})
    jsonschema.validate(value, packaged_schema("prediction"))


@pytest.mark.parametrize("name", ["event", "prediction"])
def test_the_packaged_schemas_are_valid_json_schemas(name):
    jsonschema.Draft202012Validator.check_schema(packaged_schema(name))


def schema_accepts(schema, value) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(value)


SAMPLES = [
    {"x": [1, 2.5, 3]},
    {"x": {"a": 1, "b": 2, "c": 3}, "ts": 5, "reset": True},
    {"x": [1, 2]},
    {"x": {"a": 1, "b": 2}},
    {"x": {"a": 1, "b": 2, "c": 3, "d": 4}},
    {"x": [1, "2", 3]},
    {"x": [1, True, 3]},
    {"x": "1,2,3"},
    {"y": [1, 2, 3]},
    {"x": [1, 2, 3], "ts": -1},
    {"x": [1, 2, 3], "ts": "now"},
    {"x": [1, 2, 3], "reset": 1},
    {"x": [1, 2, 3], "other": {"anything": None}},
]


def decoder_accepts(spec, value) -> bool:
    try:
        EventDecoder(spec.input, 10_000).decode(event_record("s", value))
    except BadEventError:
        return False
    return True


@pytest.mark.parametrize("value", SAMPLES)
def test_the_model_event_schema_agrees_with_the_decoder(value):
    assert schema_accepts(event_schema(FLOAT_SPEC_ABC), value) == decoder_accepts(
        FLOAT_SPEC_ABC, value
    )


@pytest.mark.parametrize(
    "value",
    [
        {"x": [0]},
        {"x": [2]},
        {"x": [3]},
        {"x": [-1]},
        {"x": [1.0]},
        {"x": [1.5]},
        {"x": {"token": 1}},
    ],
)
def test_the_token_event_schema_agrees_with_the_decoder(value):
    assert schema_accepts(event_schema(TOKEN_SPEC), value) == decoder_accepts(TOKEN_SPEC, value)


@pytest.mark.parametrize("value", SAMPLES)
def test_what_the_decoder_accepts_the_packaged_event_schema_accepts(value):
    if decoder_accepts(FLOAT_SPEC_ABC, value):
        assert schema_accepts(packaged_schema("event"), value)


FLOAT_SPEC_ABC = ModelSpec(**{**FLOAT_SPEC.__dict__, "input": FEATURES})


def test_whitespace_around_the_json_value_is_fine():
    assert decode(b' \n{"x": [1, 2, 3]}\n ').x == [1, 2, 3]


def test_data_after_the_json_value_is_not_json():
    assert reason_of(b'{"x": [1, 2, 3]} {"x": [4, 5, 6]}') == "not_json"


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["x", "ts", "reset", "a", "b", "c"]), children, max_size=4
        )
    ),
    max_leaves=12,
)
_EVENTS = st.fixed_dictionaries(
    {"x": st.lists(st.floats() | st.integers(-(2**63), 2**64 - 1), min_size=2, max_size=4) | _JSON},
    optional={"ts": st.integers(-5, 2**64 - 1) | _JSON, "reset": st.booleans() | _JSON},
)


def _outcome(value: bytes, spec: InputSpec):
    try:
        event = EventDecoder(spec, 1000).decode(event_record("s1", value))
    except BadEventError as error:
        return ("bad", error.reason)
    return ("ok", np.asarray(event.x, np.float64).tolist(), event.event_time_ms, event.reset)


# The fixtures only pick the parser, which the test switches itself for each example.
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    document=_JSON | _EVENTS,
    cut=st.integers(0, 200),
    noise=st.binary(max_size=3),
    spec=st.sampled_from([FEATURES, TOKENS]),
)
def test_orjson_and_the_standard_library_give_the_same_event_or_reason(
    json_parser, monkeypatch, document, cut, noise, spec
):
    if json_parser != "orjson":
        pytest.skip("compares both parsers itself: runs once, under the orjson variant")
    text = json.dumps(document).encode()
    for value in (text, text[:cut] + noise + text[cut:]):
        fast = _outcome(value, spec)
        with monkeypatch.context() as m:
            m.setattr(codec, "FAST_JSON", None)
            standard = _outcome(value, spec)
        assert fast == standard, value
