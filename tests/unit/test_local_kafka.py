import pytest

from pipeline.devtools import home, local_kafka
from pipeline.errors import LocalKafkaError


def test_port_from_environment_sets_controller_port_next_to_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HIDDENSTATE_KAFKA_HOME", str(tmp_path))
    monkeypatch.setenv("HIDDENSTATE_KAFKA_PORT", "19092")
    kafka = local_kafka.from_environment()
    assert (kafka.bootstrap, kafka.controller_port, kafka.home) == (
        "127.0.0.1:19092",
        19093,
        tmp_path,
    )


def test_port_that_is_not_a_number_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("HIDDENSTATE_KAFKA_PORT", "kafka")
    with pytest.raises(LocalKafkaError, match="HIDDENSTATE_KAFKA_PORT='kafka'"):
        local_kafka.from_environment()


def test_no_broker_runs_where_no_pid_file_exists(tmp_path):
    assert local_kafka.running_pid(local_kafka.LocalKafka(home=tmp_path)) is None


def test_pid_file_of_another_program_is_not_taken_for_the_broker(tmp_path):
    kafka = local_kafka.LocalKafka(home=tmp_path)
    kafka.pid_file.write_text("1\n")  # init, alive but not our broker
    assert local_kafka.running_pid(kafka) is None


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(local_kafka.shutil, "which", lambda name: None)
    with pytest.raises(LocalKafkaError, match="java is not on PATH; Kafka 4 needs Java 17"):
        local_kafka._check_java()


def test_missing_maven_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(local_kafka.shutil, "which", lambda name: None)
    with pytest.raises(LocalKafkaError, match=r"mvn .* is not on PATH"):
        local_kafka._fetch_jars(local_kafka.LocalKafka(home=tmp_path))


def test_single_node_settings_let_groups_and_transactions_work(tmp_path):
    kafka = local_kafka.LocalKafka(home=tmp_path, port=19092, controller_port=19093)
    local_kafka._write_properties(kafka)
    text = kafka.properties.read_text()
    for line in (
        "offsets.topic.replication.factor=1",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "listeners=PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093",
    ):
        assert line in text.splitlines()


def test_the_environment_variable_names_the_brokers_folder_first(monkeypatch, tmp_path):
    monkeypatch.setenv("HIDDENSTATE_KAFKA_HOME", str(tmp_path / "given"))
    assert local_kafka.from_environment().home == tmp_path / "given"


def test_in_a_checkout_the_broker_lives_in_dot_kafka_at_its_root(monkeypatch):
    monkeypatch.delenv("HIDDENSTATE_KAFKA_HOME", raising=False)
    assert home.in_checkout()
    assert local_kafka.from_environment().home == home._REPO_ROOT / ".kafka"


def test_outside_a_checkout_the_broker_lives_in_the_users_data_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("HIDDENSTATE_KAFKA_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setattr(home, "_REPO_ROOT", tmp_path / "site-packages")
    assert not home.in_checkout()
    assert local_kafka.from_environment().home == tmp_path / "data" / "hiddenstate" / "kafka"
