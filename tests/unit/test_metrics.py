import importlib.metadata

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.codec import REASONS
from pipeline.metrics import LABEL_REASONS, REBALANCE_KINDS, BatchHistogram, Metrics
from pipeline.testing import random_weights

ALLOWED_LABELS = {
    "reason",
    "cause",
    "kind",
    "partition",
    "name",
    "version",
    "identity",
    "task",
    "cell",
    "device",
    "provider",
    "result",
    "output",
    "warmth",
}


def families(registry):
    return {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}


def sample(registry, metric, **labels):
    return registry.get_sample_value(metric, labels)


def test_every_metric_is_ours_or_from_the_process_and_platform_collectors(metrics):
    foreign = {n for n in families(metrics.registry) if not n.startswith("hiddenstate_")}
    assert {n for n in foreign if not n.startswith("process_")} == {"python_info"}


def test_the_exposition_has_every_declared_metric(metrics):
    names = {
        n
        for n in families(metrics.registry)
        if n.startswith("hiddenstate_") and not n.endswith("_created")
    }
    assert names == {
        "hiddenstate_events",
        "hiddenstate_predictions",
        "hiddenstate_dead_letters",
        "hiddenstate_evictions",
        "hiddenstate_inference_seconds",
        "hiddenstate_queued_seconds",
        "hiddenstate_end_to_end_seconds",
        "hiddenstate_wave_size",
        "hiddenstate_checkpoint_seconds",
        "hiddenstate_active_streams",
        "hiddenstate_state_store_bytes",
        "hiddenstate_consumer_lag",
        "hiddenstate_assigned_partitions",
        "hiddenstate_restore_remaining_records",
        "hiddenstate_restore_seconds",
        "hiddenstate_replayed_events_skipped",
        "hiddenstate_snapshots_written",
        "hiddenstate_restored_streams",
        "hiddenstate_snapshots_discarded",
        "hiddenstate_rebalances",
        "hiddenstate_commit_failures",
        "hiddenstate_delivery_errors",
        "hiddenstate_rewinds",
        "hiddenstate_device_fallback",
        "hiddenstate_model_info",
        "hiddenstate_build_info",
        "hiddenstate_online_labels",
        "hiddenstate_online_correct",
        "hiddenstate_online_log_loss",
        "hiddenstate_online_absolute_error",
        "hiddenstate_online_squared_error",
        "hiddenstate_online_malformed_labels",
        "hiddenstate_online_labels_waiting",
        "hiddenstate_shadow_model_info",
        "hiddenstate_shadow_predictions",
        "hiddenstate_shadow_abs_difference",
        "hiddenstate_shadow_argmax_agreements",
        "hiddenstate_shadow_streams",
        "hiddenstate_shadow_inference_seconds",
        "hiddenstate_shadow_warmup_events",
        "hiddenstate_restored_cold_streams",
    }


def test_counters_are_exposed_with_the_total_suffix(metrics):
    metrics.events.inc(3)
    assert sample(metrics.registry, "hiddenstate_events_total") == 3


def test_no_label_can_hold_a_stream_id(metrics):
    metrics.set_lag(0, 5)
    metrics.set_model(
        random_weights().spec, device="cpu", provider="CPUExecutionProvider", fallback=False
    )
    shadow = random_weights(seed=1).spec
    metrics.rollout.set_shadow(shadow, device="cpu", provider="", compared=["y"], argmax=["y"])
    labels = {
        k
        for name, f in families(metrics.registry).items()
        if name.startswith("hiddenstate_")
        for s in f.samples
        for k in s.labels
    }
    assert labels - {"le"} <= ALLOWED_LABELS


def test_every_dead_letter_reason_starts_at_zero(metrics):
    for reason in REASONS:
        assert sample(metrics.registry, "hiddenstate_dead_letters_total", reason=reason) == 0


def test_both_eviction_causes_start_at_zero(metrics):
    assert sample(metrics.registry, "hiddenstate_evictions_total", cause="lru") == 0
    assert sample(metrics.registry, "hiddenstate_evictions_total", cause="ttl") == 0


def test_count_eviction_adds_to_its_cause(metrics):
    metrics.count_eviction("ttl", 4)
    assert sample(metrics.registry, "hiddenstate_evictions_total", cause="ttl") == 4


def test_model_info_names_model_device_and_provider(metrics):
    spec = random_weights("lstm").spec
    metrics.set_model(spec, device="cpu", provider="CPUExecutionProvider", fallback=True)
    info = {
        "name": "test-lstm",
        "version": "1",
        "identity": spec.identity,
        "task": "regression",
        "cell": "lstm",
        "device": "cpu",
        "provider": "CPUExecutionProvider",
    }
    assert sample(metrics.registry, "hiddenstate_model_info", **info) == 1
    assert sample(metrics.registry, "hiddenstate_device_fallback") == 1


def test_lag_is_per_partition_and_dropped_on_revocation(metrics):
    metrics.set_lag(0, 10)
    metrics.set_lag(1, 20)
    metrics.forget_partition(0)
    metrics.forget_partition(7)  # never reported: no error
    assert sample(metrics.registry, "hiddenstate_consumer_lag", partition="0") is None
    assert sample(metrics.registry, "hiddenstate_consumer_lag", partition="1") == 20


def test_end_to_end_is_measured_from_event_time_to_acknowledgement(metrics):
    metrics.observe_end_to_end([1_000_000, 1_000_500], acked_at=1_001.0)
    registry = metrics.registry
    assert sample(registry, "hiddenstate_end_to_end_seconds_count") == 2
    assert sample(registry, "hiddenstate_end_to_end_seconds_sum") == pytest.approx(1.5)
    assert sample(registry, "hiddenstate_end_to_end_seconds_bucket", le="0.5") == 1


def test_two_metrics_objects_on_fresh_registries_do_not_clash():
    Metrics(CollectorRegistry())
    Metrics(CollectorRegistry())


def test_the_same_registry_refuses_a_second_set_of_metrics(metrics):
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics(metrics.registry)


@pytest.fixture
def histogram():
    registry = CollectorRegistry()
    return registry, BatchHistogram("test_seconds", "test", [0.1, 1.0], registry)


def buckets(registry):
    return [sample(registry, "test_seconds_bucket", le=le) for le in ("0.1", "1.0", "+Inf")]


def test_a_batch_histogram_observation_lands_in_cumulative_buckets(histogram):
    registry, h = histogram
    h.observe(0.5)
    h.observe(0.1)
    assert buckets(registry) == [1, 2, 2]


def test_a_batch_histogram_records_one_value_many_times(histogram):
    registry, h = histogram
    h.observe(2.0, count=5)
    assert buckets(registry) == [0, 0, 5]
    assert sample(registry, "test_seconds_sum") == 10.0
    assert sample(registry, "test_seconds_count") == 5


def test_a_batch_histogram_records_an_array_at_once(histogram):
    registry, h = histogram
    h.observe_many(np.array([0.05, 0.1, 0.7, 3.0, np.nan]))
    assert buckets(registry) == [2, 3, 4]
    assert sample(registry, "test_seconds_sum") == pytest.approx(3.85)


def test_a_batch_histogram_ignores_nan(histogram):
    registry, h = histogram
    h.observe(float("nan"))
    assert sample(registry, "test_seconds_count") == 0


def test_latency_buckets_reach_from_50_microseconds_to_5_seconds(metrics):
    metrics.inference_seconds.observe(1e-3)
    bounds = [
        s.labels["le"]
        for s in families(metrics.registry)["hiddenstate_inference_seconds"].samples
        if "le" in s.labels
    ]
    assert (bounds[0], bounds[-2], bounds[-1]) == ("5e-05", "5.0", "+Inf")


def test_the_process_collector_reports_memory_cpu_and_start_time(metrics):
    registry = metrics.registry
    assert sample(registry, "process_resident_memory_bytes") > 0
    assert sample(registry, "process_cpu_seconds_total") >= 0
    assert sample(registry, "process_start_time_seconds") > 1.6e9


def test_build_info_carries_the_installed_version(metrics):
    version = importlib.metadata.version("hiddenstate")
    assert sample(metrics.registry, "hiddenstate_build_info", version=version) == 1


def test_every_rebalance_kind_starts_at_zero(metrics):
    for kind in REBALANCE_KINDS:
        assert sample(metrics.registry, "hiddenstate_rebalances_total", kind=kind) == 0


def test_count_rebalance_adds_one_to_its_kind(metrics):
    metrics.count_rebalance("lost")
    metrics.count_rebalance("lost")
    assert sample(metrics.registry, "hiddenstate_rebalances_total", kind="lost") == 2
    assert sample(metrics.registry, "hiddenstate_rebalances_total", kind="assigned") == 0


def test_an_unknown_rebalance_kind_is_refused_and_named(metrics):
    with pytest.raises(ValueError, match="unknown rebalance kind 'moved': expected one of"):
        metrics.count_rebalance("moved")


def test_count_commit_failure_adds_one(metrics):
    metrics.count_commit_failure()
    assert sample(metrics.registry, "hiddenstate_commit_failures_total") == 1


def test_count_delivery_error_adds_one(metrics):
    metrics.count_delivery_error()
    assert sample(metrics.registry, "hiddenstate_delivery_errors_total") == 1


def test_a_model_registered_for_labels_has_every_series_at_zero(metrics):
    metrics.online.register("m@1#0", "classification")
    registry = metrics.registry
    for result in ("judged", "late", "unknown_step"):
        assert (
            sample(registry, "hiddenstate_online_labels_total", identity="m@1#0", result=result)
            == 0
        )
    assert sample(registry, "hiddenstate_online_correct_total", identity="m@1#0") == 0
    assert sample(registry, "hiddenstate_online_log_loss_total", identity="m@1#0") == 0
    assert sample(registry, "hiddenstate_online_absolute_error_total", identity="m@1#0") is None


def test_a_regression_model_gets_the_error_sums(metrics):
    metrics.online.register("r@1#0", "regression")
    assert sample(metrics.registry, "hiddenstate_online_squared_error_total", identity="r@1#0") == 0
    assert sample(metrics.registry, "hiddenstate_online_correct_total", identity="r@1#0") is None


def test_a_shadow_model_is_counted_apart_by_its_identity(metrics):
    primary = metrics.online.register("m@1#0", "classification")
    shadow = metrics.online.register("m@2#1", "classification")
    primary.results["judged"].inc(3)
    shadow.results["judged"].inc(1)
    judged = {
        identity: sample(
            metrics.registry, "hiddenstate_online_labels_total", identity=identity, result="judged"
        )
        for identity in ("m@1#0", "m@2#1")
    }
    assert judged == {"m@1#0": 3, "m@2#1": 1}


def test_an_unknown_task_is_refused_by_name(metrics):
    with pytest.raises(ValueError, match="unknown task 'ranking'"):
        metrics.online.register("m@1#0", "ranking")


def test_every_malformed_label_reason_exists_from_the_start(metrics):
    for reason in LABEL_REASONS:
        assert (
            sample(metrics.registry, "hiddenstate_online_malformed_labels_total", reason=reason)
            == 0
        )


def test_a_shadow_makes_its_series_exist_at_zero(metrics):
    shadow = random_weights("lstm", task="classification", version="2").spec
    metrics.rollout.set_shadow(
        shadow, device="cpu", provider="CPUExecutionProvider", compared=["probs"], argmax=["probs"]
    )
    registry = metrics.registry
    assert sample(registry, "hiddenstate_shadow_abs_difference_count", output="probs") == 0
    assert sample(registry, "hiddenstate_shadow_argmax_agreements_total", output="probs") == 0
    assert sample(registry, "hiddenstate_shadow_streams", warmth="cold") == 0
    info = sample(registry, "hiddenstate_shadow_model_info", **{
        "name": shadow.name, "version": "2", "identity": shadow.identity, "task": "classification",
        "cell": "lstm", "device": "cpu", "provider": "CPUExecutionProvider",
    })  # fmt: skip
    assert info == 1


def test_a_labelled_batch_histogram_keeps_each_label_in_its_own_buckets(metrics):
    histogram = metrics.rollout.abs_difference
    histogram.observe_many("y", [0.5e-6, 0.02, float("nan")])
    histogram.observe_many("z", [3.0])
    registry = metrics.registry
    name = "hiddenstate_shadow_abs_difference"
    assert sample(registry, f"{name}_bucket", output="y", le="1e-06") == 1
    assert sample(registry, f"{name}_bucket", output="y", le="0.05") == 2
    assert sample(registry, f"{name}_count", output="z") == 1
    assert sample(registry, f"{name}_sum", output="y") == pytest.approx(0.0200005)
