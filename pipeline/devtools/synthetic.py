"""A synthetic fleet of devices: many multivariate streams, reproducible from a seed.

Numpy only, so the serving side (`hiddenstate produce`, the benchmark) and the
offline side (training) share one generator. Each stream is a device with
`features` sensors; every call to `SyntheticStreams.step()` advances every
stream by one time step, vectorised over streams::

    >>> source = SyntheticStreams(streams=3, features=2, seed=7)
    >>> batch = source.step()
    >>> batch.values.shape, batch.values.dtype, batch.anomaly.shape
    ((3, 2), dtype('float32'), (3,))
    >>> series = SyntheticStreams(streams=3, features=2, seed=7).generate(100)
    >>> series.values.shape
    (3, 100, 2)

What one stream's feature j looks like at step t::

    value = level + amplitude * loading[j] * season(t) + noise + spike

- `level`: a trend. It drifts by a per-stream slope each step and is pulled
  back gently towards the stream's base, so long runs stay bounded.
- `season(t)`: two harmonics of a per-stream integer period
  (`SyntheticStreams.periods`, between `min_period` and `max_period`
  steps), shared by the stream's features with per-feature loadings in
  [-1, 1]. This is what a seasonal-naive forecast exploits.
- `noise`: AR(1) with coefficient 0.5 and a per-stream standard deviation
  around `noise`. It is autocorrelated, so a model that tracks it beats
  seasonal naive.
- **Regime shifts**: each step, each stream starts a new regime with
  probability `regime_shift_rate`. Its base level jumps, its amplitude is
  rescaled and its slope is drawn again. The step is flagged in
  `regime_shift`.
- **Anomalies**: each step, each stream is hit by a spike with probability
  `anomaly_rate`: at least 6 noise deviations, with a random sign, on
  about half its features. The spike lands on that one observation only and
  never enters the trend, season or noise. The step is flagged in `anomaly`.

Reproducibility: a source is a pure function of its constructor arguments.
The same seed gives the same values, and `generate(n)` gives exactly what n
calls of `step()` would have given.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

_AR = 0.5  # AR(1) coefficient of the noise: persistent, but not so much that last value is optimal
_MEAN_REVERSION = 0.002  # per step, pull of the level towards the regime's base
_SPIKE_MIN, _SPIKE_MAX = 6.0, 10.0  # spike size, in noise standard deviations (plus amplitude)


@dataclass(frozen=True)
class StepBatch:
    """One step of every stream.

    `values[i]` is stream i's feature vector (float32, shape `[streams, features]`).
    `anomaly[i]` is True when a spike was injected into it, and `regime_shift[i]`
    is True when stream i started a new regime at this step (both shape `[streams]`).
    `t` is the step's index, counted from 0 for each source.
    """

    t: int
    values: np.ndarray
    anomaly: np.ndarray
    regime_shift: np.ndarray


@dataclass(frozen=True)
class SyntheticSeries:
    """Many steps of every stream, stacked along axis 1.

    `values`: `[streams, steps, features]` float32. `anomaly` and `regime_shift`:
    `[streams, steps]` bool. `expected`: `[streams, steps, features]` float32, the
    trend plus season without noise or spikes (the best forecast anyone could make).
    `periods`: `[streams]` int, each stream's seasonal period in steps.
    """

    values: np.ndarray
    anomaly: np.ndarray
    regime_shift: np.ndarray
    expected: np.ndarray
    periods: np.ndarray


class SyntheticStreams:
    """A stateful, vectorised source of `streams` device streams with `features` sensors each.

    Call `step()` (or iterate) for the next value of every stream. Call
    `generate(steps)` for a block of steps as arrays. Both advance the same
    state. `stream_ids` and `feature_names` are the names the events use.
    """

    def __init__(
        self,
        streams: int = 16,
        features: int = 8,
        seed: int = 0,
        *,
        noise: float = 0.3,
        min_period: int = 12,
        max_period: int = 48,
        anomaly_rate: float = 0.002,
        regime_shift_rate: float = 0.002,
    ) -> None:
        if streams < 1 or features < 1:
            raise ValueError(f"need at least one stream and one feature, got {streams}, {features}")
        if not 2 <= min_period <= max_period:
            raise ValueError(f"need 2 <= min_period <= max_period, got {min_period}, {max_period}")
        if not (0.0 <= anomaly_rate <= 1.0 and 0.0 <= regime_shift_rate <= 1.0):
            raise ValueError("anomaly_rate and regime_shift_rate are probabilities in [0, 1]")
        self.streams = streams
        self.features = features
        self.seed = seed
        self.anomaly_rate = anomaly_rate
        self.regime_shift_rate = regime_shift_rate
        self.stream_ids: tuple[str, ...] = tuple(f"device-{i:05d}" for i in range(streams))
        self.feature_names: tuple[str, ...] = tuple(f"sensor_{j}" for j in range(features))
        # One generator drawn from in a fixed order, both here and in step(),
        # is what makes the source a pure function of its arguments.
        self._rng = np.random.default_rng(seed)
        rng = self._rng
        n, f = streams, features
        self.periods: np.ndarray = rng.integers(min_period, max_period + 1, size=n)
        self._phase = rng.uniform(0.0, 2.0 * np.pi, size=n)
        self._phase2 = rng.uniform(0.0, 2.0 * np.pi, size=n)
        self._loading = rng.uniform(-1.0, 1.0, size=(n, f))
        # Features sit at different offsets so that they are not interchangeable.
        self._offset = rng.normal(0.0, 0.5, size=(n, f))
        self._base = rng.normal(0.0, 0.5, size=(n, 1))
        self._level = self._base.copy()
        self._slope = rng.normal(0.0, 0.002, size=(n, 1))
        self._amplitude = rng.uniform(0.5, 2.0, size=(n, 1))
        self._noise_std = noise * rng.uniform(0.5, 1.5, size=(n, 1))
        self._noise = rng.normal(0.0, 1.0, size=(n, f)) * self._noise_std
        self._t = 0

    @property
    def t(self) -> int:
        """Steps generated so far (the index the next `step()` will have)."""
        return self._t

    def step(self) -> StepBatch:
        """Advance every stream by one step and return its values and flags."""
        values, expected, anomaly, shift = self._advance()
        del expected
        return StepBatch(t=self._t - 1, values=values, anomaly=anomaly, regime_shift=shift)

    def generate(self, steps: int) -> SyntheticSeries:
        """The next `steps` steps of every stream, as `[streams, steps, ...]` arrays."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        n, f = self.streams, self.features
        values = np.empty((n, steps, f), dtype=np.float32)
        expected = np.empty((n, steps, f), dtype=np.float32)
        anomaly = np.empty((n, steps), dtype=bool)
        shift = np.empty((n, steps), dtype=bool)
        # A loop over time, vectorised over streams: the same code path as
        # step(), which is what keeps the two bit-for-bit equal.
        for k in range(steps):
            values[:, k], expected[:, k], anomaly[:, k], shift[:, k] = self._advance()
        return SyntheticSeries(
            values=values,
            anomaly=anomaly,
            regime_shift=shift,
            expected=expected,
            periods=self.periods.copy(),
        )

    def __iter__(self) -> Iterator[StepBatch]:
        """Endless steps: `for batch in source: ...` (stop it yourself)."""
        while True:
            yield self.step()

    def _advance(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rng = self._rng
        n, f = self.streams, self.features
        # Draw every random number for this step up front, whether it is used or not:
        # the draw count per step is then constant, so flags do not shift later values.
        shift = rng.random(n) < self.regime_shift_rate
        jump = rng.normal(0.0, 1.5, size=(n, 1))
        rescale = rng.uniform(0.5, 1.5, size=(n, 1))
        new_slope = rng.normal(0.0, 0.002, size=(n, 1))
        innovation = rng.normal(0.0, 1.0, size=(n, f))
        anomaly = rng.random(n) < self.anomaly_rate
        spike_size = rng.uniform(_SPIKE_MIN, _SPIKE_MAX, size=(n, 1))
        spike_sign = np.where(rng.random((n, 1)) < 0.5, -1.0, 1.0)
        spike_features = rng.random((n, f)) < 0.5

        s = shift[:, None]
        self._base = np.where(s, self._base + jump, self._base)
        self._level = np.where(s, self._level + jump, self._level)
        self._amplitude = np.where(s, np.clip(self._amplitude * rescale, 0.3, 3.0), self._amplitude)
        self._slope = np.where(s, new_slope, self._slope)
        self._level = self._level + self._slope - _MEAN_REVERSION * (self._level - self._base)

        angle = 2.0 * np.pi * self._t / self.periods
        season = np.sin(angle + self._phase) + 0.5 * np.sin(2.0 * angle + self._phase2)
        expected = self._level + self._offset + self._amplitude * self._loading * season[:, None]

        self._noise = _AR * self._noise + np.sqrt(1.0 - _AR**2) * self._noise_std * innovation
        # At least one feature carries the spike, so every flagged step is visible.
        spike_features[np.arange(n), rng.integers(0, f, size=n)] = True
        spike = (spike_sign * spike_size * (self._noise_std + self._amplitude)) * spike_features
        values = expected + self._noise + np.where(anomaly[:, None], spike, 0.0)
        self._t += 1
        return values.astype(np.float32), expected.astype(np.float32), anomaly, shift
