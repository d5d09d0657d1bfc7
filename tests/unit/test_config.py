import argparse
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import (
    ServeConfig,
    TopicsConfig,
    add_arguments,
    client_from_sources,
    from_sources,
    load_config,
    settings_markdown,
    settings_table,
)
from pipeline.errors import ConfigError
from pipeline.testing import random_weights

REQUIRED = ["--input-topic", "events", "--output-topic", "predictions", "--model", "m.onnx"]


def load(*flags: str, **env: str) -> ServeConfig:
    return load_config([*REQUIRED, *flags], {f"HIDDENSTATE_{k.upper()}": v for k, v in env.items()})


def test_defaults_fill_every_setting_not_given():
    config = load()
    assert config.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert config.runtime.intra_op_threads == 1
    assert config.runtime.spinning is False
    assert config.observability.metrics_port == 9108
    assert config.delivery.guarantee == "at-least-once"


def test_environment_fills_a_setting_without_a_flag():
    assert load(max_streams="5000").store.max_streams == 5000


def test_flag_beats_environment():
    assert load("--max-streams", "7", max_streams="5000").store.max_streams == 7


def test_required_settings_can_come_from_the_environment():
    env = {
        "HIDDENSTATE_INPUT_TOPIC": "a",
        "HIDDENSTATE_OUTPUT_TOPIC": "b",
        "HIDDENSTATE_MODEL": "m",
    }
    assert load_config([], env).topics.input_topic == "a"


def test_dead_letter_topic_and_group_id_derive_from_the_input_topic():
    config = load()
    assert config.topics.dead_letter_topic == "events.dead-letter"
    assert config.kafka.group_id == "hiddenstate-events"


def test_an_explicit_dead_letter_topic_is_kept():
    assert load("--dead-letter-topic", "bad").topics.dead_letter_topic == "bad"


def spec(name: str = "gru", version: str = "1", seed: int = 0) -> Any:
    return random_weights("gru", name=name, version=version, seed=seed).spec


def test_changelog_topic_derives_from_input_topic_and_the_model_identity_made_safe():
    model = spec("gru vowels/2", "1.0")
    expected = f"events.gru-vowels-2.1.0.{model.weights_sha256[:16]}.changelog"
    assert load().topics.changelog_for(model) == expected


def test_two_versions_of_one_model_name_get_changelogs_of_their_own():
    topics = load().topics
    assert topics.changelog_for(spec(version="1")) != topics.changelog_for(spec(version="2"))


def test_two_trainings_of_one_model_version_get_changelogs_of_their_own():
    topics = load().topics
    assert topics.changelog_for(spec(seed=1)) != topics.changelog_for(spec(seed=2))


def test_a_derived_changelog_name_too_long_for_kafka_keeps_its_weights():
    model = spec("m" * 300)
    name = load().topics.changelog_for(model)
    assert len(name) == 249
    assert name.endswith(f".{model.weights_sha256[:16]}.changelog")


def test_an_explicit_changelog_topic_wins_over_the_derived_one():
    assert load("--changelog-topic", "states").topics.changelog_for(spec()) == "states"


def test_the_shadow_changelog_is_the_one_the_same_model_would_serve_from():
    model = spec(version="2")
    config = load("--shadow-model", "v2.onnx")
    assert config.rollout.shadow_changelog_for("events", model) == config.topics.changelog_for(
        model
    )


def test_the_shadow_output_topic_derives_from_the_output_topic():
    assert load("--shadow-model", "v2.onnx").rollout.shadow_output_topic == "predictions.shadow"


def test_no_shadow_output_topic_is_derived_without_a_shadow_model():
    assert load().rollout.shadow_output_topic == ""


@pytest.mark.parametrize(
    "flags",
    [
        ("--shadow-output-topic", "other"),
        ("--shadow-changelog-topic", "other"),
        ("--shadow-warmup-events", "10"),
    ],
    ids=["output", "changelog", "warmup"],
)
def test_a_shadow_setting_without_a_shadow_model_is_refused(flags):
    with pytest.raises(ConfigError, match="has no effect without --shadow-model"):
        load(*flags)


def test_the_served_model_as_its_own_shadow_is_refused():
    with pytest.raises(ConfigError, match="is the --model file itself"):
        load("--shadow-model", "m.onnx")


@pytest.mark.parametrize(
    ("flags", "clash"),
    [
        (("--shadow-output-topic", "predictions"), "--output-topic"),
        (("--shadow-output-topic", "events"), "--input-topic"),
        (
            ("--shadow-changelog-topic", "states", "--changelog-topic", "states"),
            "--changelog-topic",
        ),
        (
            ("--shadow-changelog-topic", "x", "--shadow-output-topic", "x"),
            "--shadow-changelog-topic",
        ),
    ],
    ids=["output", "input", "changelog", "each-other"],
)
def test_shadow_topics_must_differ_from_every_other_topic(flags, clash):
    with pytest.raises(ConfigError, match=f"{clash} / HIDDENSTATE_[A-Z_]+: both are"):
        load("--shadow-model", "v2.onnx", *flags)


def test_the_allowed_cold_fraction_is_between_0_and_1():
    with pytest.raises(ConfigError, match=r"promotion-max-cold-fraction.*<= 1"):
        load("--promotion-max-cold-fraction", "1.5")


def test_missing_required_settings_are_all_named_with_flag_and_env():
    with pytest.raises(ConfigError) as caught:
        load_config([], {})
    message = str(caught.value)
    for flag, env in [
        ("--input-topic", "HIDDENSTATE_INPUT_TOPIC"),
        ("--output-topic", "HIDDENSTATE_OUTPUT_TOPIC"),
        ("--model", "HIDDENSTATE_MODEL"),
    ]:
        assert f"{flag} / {env}: required" in message


def test_a_non_integer_names_the_flag_the_env_and_what_is_allowed():
    with pytest.raises(
        ConfigError,
        match=r"--max-streams / HIDDENSTATE_MAX_STREAMS: expected an integer >= 1, got 'many' \(from env\)",
    ):
        load(max_streams="many")


def test_a_value_below_the_minimum_is_refused():
    with pytest.raises(
        ConfigError, match="--max-wave-size / HIDDENSTATE_MAX_WAVE_SIZE: expected >= 1"
    ):
        load("--max-wave-size", "0")


def test_a_port_above_65535_is_refused():
    with pytest.raises(ConfigError, match="expected >= 0 and <= 65535"):
        load("--metrics-port", "70000")


def test_a_non_finite_number_is_refused():
    with pytest.raises(ConfigError, match=r"idle-ttl-seconds.*finite"):
        load("--idle-ttl-seconds", "nan")


def test_an_unknown_choice_lists_the_allowed_ones():
    with pytest.raises(
        ConfigError, match="--device / HIDDENSTATE_DEVICE: expected one of 'cpu', 'cuda', 'auto'"
    ):
        load("--device", "tpu")


def test_choices_ignore_case():
    assert load(log_level="debug").observability.log_level == "DEBUG"


@pytest.mark.parametrize(
    ("text", "expected"), [("1", True), ("yes", True), ("ON", True), ("0", False), ("false", False)]
)
def test_boolean_environment_values(text, expected):
    assert load(spinning=text).runtime.spinning is expected


def test_a_malformed_boolean_is_refused():
    with pytest.raises(ConfigError, match="HIDDENSTATE_SPINNING: expected true or false"):
        load(spinning="maybe")


def test_the_negated_boolean_flag_beats_the_environment():
    assert load("--no-spinning", spinning="1").runtime.spinning is False


def test_the_same_topic_for_input_and_output_is_refused():
    with pytest.raises(
        ConfigError,
        match="--input-topic / HIDDENSTATE_INPUT_TOPIC and --output-topic / HIDDENSTATE_OUTPUT_TOPIC: both are 'events'",
    ):
        load("--output-topic", "events")


def test_an_invalid_topic_name_is_refused():
    with pytest.raises(ConfigError, match="'my topic' is not a valid Kafka topic name"):
        load("--output-topic", "my topic")


def test_an_empty_broker_in_the_list_is_refused():
    with pytest.raises(ConfigError, match="--bootstrap-servers"):
        load("--bootstrap-servers", "a:9092,,b:9092")


def test_a_sasl_protocol_needs_a_mechanism():
    with pytest.raises(
        ConfigError,
        match="--sasl-mechanism / HIDDENSTATE_SASL_MECHANISM: required with security protocol SASL_SSL",
    ):
        load("--security-protocol", "SASL_SSL")


def test_a_sasl_mechanism_needs_user_name_and_password():
    with pytest.raises(ConfigError) as caught:
        load("--security-protocol", "SASL_PLAINTEXT", "--sasl-mechanism", "SCRAM-SHA-512")
    assert "--sasl-plain-username" in str(caught.value)
    assert "--sasl-plain-password" in str(caught.value)


def test_a_sasl_mechanism_without_a_sasl_protocol_is_refused():
    with pytest.raises(ConfigError, match="PLAIN has no effect with security protocol PLAINTEXT"):
        load("--sasl-mechanism", "PLAIN")


def test_an_ssl_file_must_be_readable(tmp_path):
    with pytest.raises(
        ConfigError, match=r"--ssl-cafile / HIDDENSTATE_SSL_CAFILE: .* does not exist"
    ):
        load("--security-protocol", "SSL", "--ssl-cafile", str(tmp_path / "missing.pem"))


def test_an_ssl_file_with_a_plaintext_protocol_is_refused(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("pem")
    with pytest.raises(ConfigError, match="has no effect with security protocol PLAINTEXT"):
        load("--ssl-cafile", str(ca))


def test_a_wave_larger_than_the_store_is_refused():
    with pytest.raises(ConfigError, match="one wave must fit in the store"):
        load("--max-wave-size", "64", "--max-streams", "10")


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as caught:
        load("--max-streams", "x", "--device", "tpu")
    assert "--max-streams" in str(caught.value)
    assert "--device" in str(caught.value)


def test_describe_masks_the_password_and_says_where_values_came_from():
    text = load(
        "--security-protocol",
        "SASL_SSL",
        "--sasl-mechanism",
        "PLAIN",
        "--sasl-plain-username",
        "svc",
        sasl_plain_password="hunter2",
    ).describe()
    assert "hunter2" not in text
    assert "sasl_plain_password = ***  (env)" in text
    assert "input_topic = events  (flag)" in text
    assert "group_id = hiddenstate-events  (derived)" in text


def test_redacted_leaves_an_unset_secret_empty():
    assert load().redacted()["sasl_plain_password"] == ""


def test_client_kwargs_pass_the_security_settings_through(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("pem")
    config = load(
        "--bootstrap-servers",
        "k1:9093, k2:9093",
        "--security-protocol",
        "SASL_SSL",
        "--sasl-mechanism",
        "SCRAM-SHA-256",
        "--sasl-plain-username",
        "svc",
        "--ssl-cafile",
        str(ca),
        sasl_plain_password="pw",
    )
    assert config.kafka.client_kwargs() == {
        "bootstrap_servers": ["k1:9093", "k2:9093"],
        "client_id": "hiddenstate",
        "security_protocol": "SASL_SSL",
        "bootstrap_timeout_ms": 15_000,
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "svc",
        "sasl_plain_password": "pw",
        "ssl_cafile": str(ca),
    }


def test_consumer_kwargs_commit_by_hand_and_set_static_membership():
    kwargs = load("--instance-id", "pod-0").kafka.consumer_kwargs()
    assert kwargs["enable_auto_commit"] is False
    assert kwargs["group_instance_id"] == "pod-0"
    assert kwargs["group_id"] == "hiddenstate-events"


def test_consumer_kwargs_leave_out_static_membership_when_not_set():
    assert "group_instance_id" not in load().kafka.consumer_kwargs()


def test_every_setting_has_its_own_flag_and_environment_variable():
    rows = settings_table()
    assert len({r["flag"] for r in rows}) == len(rows)
    assert len({r["env"] for r in rows}) == len(rows)
    assert all(r["env"] == "HIDDENSTATE_" + r["flag"][2:].replace("-", "_").upper() for r in rows)


def test_the_flags_join_another_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--verbose", action="store_true")
    add_arguments(parser)
    flags = vars(parser.parse_args(["--verbose", *REQUIRED, "--max-streams", "9"]))
    assert from_sources(flags, {}).store.max_streams == 9


def test_the_config_is_frozen():
    config = load()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.store.max_streams = 1  # type: ignore[misc]


def test_a_section_alone_has_its_defaults():
    assert TopicsConfig(input_topic="a", output_topic="b").dead_letter_topic == ""


def test_the_default_wave_size_shrinks_to_fit_a_small_store():
    config = load("--max-streams", "10")
    assert config.processing.max_wave_size == 10
    assert config.sources["max_wave_size"] == "derived"


def test_the_configuration_page_shows_the_current_settings_table():
    page = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    assert settings_markdown() in page


def test_the_session_timeout_reaches_both_clients_with_a_heartbeat_a_third_of_it():
    kafka = load("--session-timeout-ms", "6000").kafka
    consumer = kafka.consumer_kwargs()
    librdkafka = kafka.librdkafka_consumer_config()
    assert (consumer["session_timeout_ms"], consumer["heartbeat_interval_ms"]) == (6000, 2000)
    assert (librdkafka["session.timeout.ms"], librdkafka["heartbeat.interval.ms"]) == (6000, 2000)


def test_the_default_session_timeout_keeps_the_clients_default_heartbeat():
    kafka = load(session_timeout_ms="45000").kafka
    assert kafka.consumer_kwargs()["heartbeat_interval_ms"] == 3000


def test_the_transport_defaults_to_auto():
    assert load().kafka.transport == "auto"


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_the_compression_type_reaches_both_producers_and_no_consumer(codec):
    kafka = load("--compression-type", codec).kafka
    assert kafka.producer_kwargs()["compression_type"] == codec
    assert kafka.librdkafka_producer_config()["compression.type"] == codec
    assert "compression_type" not in kafka.consumer_kwargs()


def test_no_compression_type_leaves_each_clients_default():
    kafka = load().kafka
    assert "compression_type" not in kafka.producer_kwargs()
    assert "compression.type" not in kafka.librdkafka_producer_config()


def test_a_registry_format_without_a_registry_url_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"--schema-registry-url .* required with --input-format"):
        load("--input-format", "avro")


def test_a_registry_url_with_json_both_ways_has_no_effect_and_is_refused():
    with pytest.raises(ConfigError, match="has no effect with the json formats"):
        load("--schema-registry-url", "http://127.0.0.1:8081")


def test_a_registry_user_without_a_password_is_refused():
    with pytest.raises(ConfigError, match="give both or neither"):
        load(
            "--output-format",
            "avro",
            "--schema-registry-url",
            "http://r:8081",
            "--schema-registry-username",
            "u",
        )


def test_the_registry_password_is_masked_in_the_description():
    config = load(
        "--output-format",
        "protobuf",
        "--schema-registry-url",
        "https://r:8081",
        schema_registry_username="u",
        schema_registry_password="hunter2",
    )
    assert "hunter2" not in config.describe()
    assert "schema_registry_password = ***" in config.describe()


def test_client_settings_for_produce_are_checked_like_serves():
    with pytest.raises(
        ConfigError, match="--sasl-mechanism / HIDDENSTATE_SASL_MECHANISM: required"
    ):
        client_from_sources(
            {"bootstrap_servers": "b:9092"},
            {"HIDDENSTATE_SECURITY_PROTOCOL": "SASL_SSL"},
            registry_needed=False,
        )


def test_client_settings_build_the_producers_keyword_arguments():
    kafka, _ = client_from_sources(
        {"bootstrap_servers": "b:9092", "compression_type": "lz4"},
        {"HIDDENSTATE_SASL_PLAIN_USERNAME": "u"},
        registry_needed=False,
    )
    assert kafka.producer_kwargs()["bootstrap_servers"] == ["b:9092"]
    assert kafka.producer_kwargs()["compression_type"] == "lz4"
    assert kafka.producer_kwargs()["sasl_plain_username"] == "u"


def test_client_settings_need_the_registry_url_for_a_registry_format():
    with pytest.raises(ConfigError, match="required with a registry format"):
        client_from_sources({}, {}, registry_needed=True)


def test_labels_and_the_streams_api_are_off_by_default():
    online = load().online
    assert (online.labels_topic, online.streams_api, online.label_horizon_steps) == ("", False, 64)


def test_the_labels_dead_letter_topic_derives_from_the_labels_topic():
    assert load("--labels-topic", "truth").online.labels_dead_letter_topic == "truth.dead-letter"


def test_the_streams_api_is_turned_on_by_its_environment_variable():
    assert load(streams_api="true").online.streams_api is True


def test_a_labels_topic_that_is_the_input_topic_is_refused():
    with pytest.raises(
        ConfigError, match="--input-topic / HIDDENSTATE_INPUT_TOPIC and --labels-topic"
    ):
        load("--labels-topic", "events")


def test_an_invalid_labels_topic_name_is_refused():
    with pytest.raises(ConfigError, match="--labels-topic / HIDDENSTATE_LABELS_TOPIC: 'a b'"):
        load("--labels-topic", "a b")


def test_a_labels_dead_letter_topic_without_a_labels_topic_is_refused():
    with pytest.raises(ConfigError, match="has no effect without --labels-topic"):
        load("--labels-dead-letter-topic", "bad-labels")


def test_a_horizon_of_zero_steps_is_refused():
    with pytest.raises(
        ConfigError, match="--label-horizon-steps / HIDDENSTATE_LABEL_HORIZON_STEPS"
    ):
        load("--label-horizon-steps", "0")


def test_a_streams_api_port_without_the_api_is_refused():
    with pytest.raises(ConfigError, match="have no effect unless --streams-api"):
        load("--streams-api-port", "9109")


def test_a_streams_api_host_without_a_port_of_its_own_is_refused():
    with pytest.raises(
        ConfigError, match="give --streams-api-port / HIDDENSTATE_STREAMS_API_PORT too"
    ):
        load("--streams-api", "--streams-api-host", "10.0.0.1")


def test_the_streams_api_port_cannot_be_the_metrics_port():
    with pytest.raises(ConfigError, match="9108 is the metrics port"):
        load("--streams-api", "--streams-api-port", "9108")


def test_the_streams_api_on_a_port_of_its_own_is_accepted():
    online = load("--streams-api", "--streams-api-port", "9109").online
    assert (online.streams_api, online.streams_api_port, online.streams_api_host) == (
        True,
        9109,
        "",
    )
