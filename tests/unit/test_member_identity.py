"""Who a member is across restarts: what its transactional ids are made of."""

from __future__ import annotations

import socket

from pipeline.config import load_config
from pipeline.serve import member_identity, transaction_timeout_s

REQUIRED = ["--model", "m.onnx", "--input-topic", "events", "--output-topic", "out"]


def test_the_instance_id_is_the_identity_when_given():
    config = load_config([*REQUIRED, "--instance-id", "pod-3"], {})
    assert member_identity(config, 9108) == "pod-3"


def test_without_an_instance_id_the_host_and_the_metrics_port_make_a_stable_identity():
    config = load_config(REQUIRED, {})
    first, restarted = member_identity(config, 9108), member_identity(config, 9108)
    assert first == restarted == f"{socket.gethostname()}-9108"
    assert member_identity(config, 9109) != first  # two servers on one host differ


def test_an_ephemeral_metrics_port_warns_that_restarts_will_not_fence(caplog):
    config = load_config([*REQUIRED, "--metrics-port", "0"], {})
    member_identity(config, 40123)
    assert "--instance-id" in caplog.text


def test_the_transaction_timeout_outlasts_two_checkpoint_intervals_and_never_drops_below_10_s():
    short = load_config([*REQUIRED, "--checkpoint-interval-seconds", "0.5"], {})
    long = load_config([*REQUIRED, "--checkpoint-interval-seconds", "30"], {})
    assert transaction_timeout_s(short) == 10.0
    assert transaction_timeout_s(long) == 65.0
