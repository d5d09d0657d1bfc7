"""pipeline.devtools.synthetic: shapes, reproducibility, and the documented trend, season, shifts and spikes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.devtools.synthetic import SyntheticStreams


def test_generate_returns_streams_by_steps_by_features_float32() -> None:
    series = SyntheticStreams(streams=5, features=3, seed=1).generate(40)
    assert series.values.shape == (5, 40, 3)
    assert series.values.dtype == np.float32
    assert series.expected.shape == (5, 40, 3)
    assert series.anomaly.shape == series.regime_shift.shape == (5, 40)
    assert series.anomaly.dtype == series.regime_shift.dtype == np.bool_


def test_default_is_eight_features_with_named_streams() -> None:
    source = SyntheticStreams(streams=2)
    assert source.step().values.shape == (2, 8)
    assert source.feature_names == tuple(f"sensor_{j}" for j in range(8))
    assert source.stream_ids == ("device-00000", "device-00001")


def test_same_seed_gives_identical_values_and_flags() -> None:
    a = SyntheticStreams(streams=4, seed=42).generate(300)
    b = SyntheticStreams(streams=4, seed=42).generate(300)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.anomaly, b.anomaly)
    np.testing.assert_array_equal(a.regime_shift, b.regime_shift)


def test_different_seeds_give_different_values() -> None:
    a = SyntheticStreams(streams=4, seed=1).generate(50)
    b = SyntheticStreams(streams=4, seed=2).generate(50)
    assert not np.array_equal(a.values, b.values)


def test_stepping_n_times_equals_generating_n_steps() -> None:
    stepped = SyntheticStreams(streams=6, seed=9)
    rows = [stepped.step() for _ in range(25)]
    generated = SyntheticStreams(streams=6, seed=9).generate(25)
    np.testing.assert_array_equal(np.stack([r.values for r in rows], axis=1), generated.values)
    np.testing.assert_array_equal(np.stack([r.anomaly for r in rows], axis=1), generated.anomaly)
    assert [r.t for r in rows] == list(range(25))
    assert stepped.t == 25


def test_generate_continues_where_the_previous_call_stopped() -> None:
    source = SyntheticStreams(streams=3, seed=5)
    first, second = source.generate(10), source.generate(10)
    whole = SyntheticStreams(streams=3, seed=5).generate(20)
    np.testing.assert_array_equal(
        np.concatenate([first.values, second.values], axis=1), whole.values
    )


def test_iterating_yields_successive_steps() -> None:
    source = SyntheticStreams(streams=2, seed=0)
    steps = [batch.t for batch, _ in zip(source, range(4), strict=False)]
    assert steps == [0, 1, 2, 3]


def test_flagged_anomalies_stand_far_out_of_the_noise() -> None:
    series = SyntheticStreams(streams=64, seed=3, anomaly_rate=0.01).generate(500)
    deviation = np.abs(series.values - series.expected).max(axis=-1)
    assert series.anomaly.sum() > 100
    assert np.median(deviation[series.anomaly]) > 5 * np.median(deviation[~series.anomaly])
    assert series.anomaly.mean() == pytest.approx(0.01, rel=0.25)


def test_no_anomaly_is_flagged_when_the_rate_is_zero() -> None:
    series = SyntheticStreams(streams=16, seed=0, anomaly_rate=0.0).generate(200)
    assert not series.anomaly.any()


def test_regime_shift_moves_the_level_at_the_flagged_step() -> None:
    series = SyntheticStreams(streams=64, seed=4, regime_shift_rate=0.01, noise=0.01).generate(400)
    stream, step = np.argwhere(series.regime_shift[:, 1:])[0] + (0, 1)
    jumps = np.abs(np.diff(series.expected.mean(axis=-1), axis=1))
    assert series.regime_shift.sum() > 100
    assert jumps[stream, step - 1] > np.median(jumps)


def test_each_stream_has_a_seasonal_period_within_the_bounds() -> None:
    source = SyntheticStreams(streams=200, seed=0, min_period=10, max_period=20)
    assert source.periods.min() >= 10
    assert source.periods.max() <= 20
    series = SyntheticStreams(
        streams=1, seed=7, noise=0.0, anomaly_rate=0.0, regime_shift_rate=0.0
    ).generate(400)
    period = int(series.periods[0])
    half = period // 2
    lagged = series.expected[0, period:] - series.expected[0, :-period]
    half_lagged = series.expected[0, half:] - series.expected[0, :-half]
    # The season repeats after one period (only the slow trend is left), not after half of one.
    assert np.abs(lagged).mean() < 0.5 * np.abs(half_lagged).mean()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"streams": 0},
        {"features": 0},
        {"min_period": 1},
        {"min_period": 30, "max_period": 20},
        {"anomaly_rate": 2.0},
    ],
)
def test_impossible_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies per setting
        SyntheticStreams(**kwargs)  # type: ignore[arg-type]


def test_generator_module_depends_on_numpy_only() -> None:
    source = (
        Path(__file__).resolve().parents[3] / "pipeline" / "devtools" / "synthetic.py"
    ).read_text()
    imports = set(re.findall(r"^(?:from|import) ([\w.]+)", source, re.MULTILINE))
    assert imports <= {"__future__", "collections.abc", "dataclasses", "numpy"}
