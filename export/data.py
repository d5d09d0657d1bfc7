"""Training data: real series shipped inside the `sktime` wheel, and the synthetic fleet.

Nothing is downloaded at run time. The real series are UCR/UEA `.ts` files
inside the installed `sktime` package, and the text ships with Python. We read them with a small parser of
our own, because importing sktime would pull in pandas and scikit-learn
just to open a text file.

| name | task | streams | what |
| --- | --- | --- | --- |
| `vowels` | classification | 640 utterances, 7 to 29 steps, 12 LPC channels | which of 9 speakers is talking, at every step |
| `motions` | regression | 80 recordings, 100 steps, 6 channels | next accelerometer and gyroscope reading |
| `synthetic` | regression | `pipeline.devtools.synthetic` devices, 8 sensors | next reading of every sensor |
| `text` | next_token | CPython's documentation topics (`pydoc_data`), 97 characters | next character |

Every set is split by stream, into train, validation and held-out test.
A held-out stream is then served from a zero state, exactly as the server
would start it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.devtools.synthetic import SyntheticStreams
from pipeline.errors import ExportError

DATASETS = ("vowels", "motions", "synthetic", "text")


@dataclass(frozen=True)
class SequenceSet:
    """Padded sequences: one row per stream.

    `inputs`: `[n, T, n_features]` float32 (int64 token ids for `next_token`),
    zero after each row's length. `targets`: `[n, T, n_outputs]` float32
    (regression), or `[n, T]` int64 (class or next-token id). `lengths`: `[n]`.
    `keys`: stream ids, for events. `periods`: `[n]` seasonal period per
    stream, when there is one (seasonal-naive baseline).
    """

    inputs: np.ndarray
    targets: np.ndarray
    lengths: np.ndarray
    keys: tuple[str, ...]
    periods: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, index: np.ndarray) -> SequenceSet:
        """The rows at `index`, in that order."""
        return SequenceSet(
            inputs=self.inputs[index],
            targets=self.targets[index],
            lengths=self.lengths[index],
            keys=tuple(self.keys[i] for i in index),
            periods=None if self.periods is None else self.periods[index],
        )

    def mask(self) -> np.ndarray:
        """`[n, T]` bool: True on real steps, False on padding."""
        return np.arange(self.inputs.shape[1])[None, :] < self.lengths[:, None]


@dataclass(frozen=True)
class Dataset:
    """A task with its splits and the names the metadata will carry.

    `labels`: class names (classification) or vocabulary (next_token).
    `targets`: names of the forecast targets (regression).
    """

    name: str
    task: str
    features: tuple[str, ...]
    train: SequenceSet
    val: SequenceSet
    test: SequenceSet
    labels: tuple[str, ...] | None = None
    targets: tuple[str, ...] | None = None
    description: str = ""

    @property
    def n_outputs(self) -> int:
        """Forecast targets, classes or vocabulary size."""
        if self.task == "regression":
            return len(self.targets or ())
        return len(self.labels or ())


def load_dataset(name: str, *, seed: int = 0, quick: bool = False) -> Dataset:
    """Load data set `name` (one of DATASETS). `quick` makes synthetic sets small, for tests."""
    if name == "vowels":
        return load_vowels(seed=seed)
    if name == "motions":
        return load_motions(seed=seed)
    if name == "synthetic":
        return load_synthetic(seed=seed, streams=48 if quick else 480, steps=120 if quick else 300)
    if name == "text":
        return load_text(seed=seed, chunk=64 if quick else 256, max_chunks=200 if quick else 1200)
    raise ExportError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")


def sktime_data_dir() -> Path:
    """The folder of data files inside the installed sktime wheel (without importing sktime)."""
    spec = importlib.util.find_spec("sktime")
    if spec is None or not spec.submodule_search_locations:
        raise ExportError(
            "the real data sets ship inside the sktime package, which is not installed; "
            "pip install 'hiddenstate[export]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def read_ts(path: Path) -> tuple[list[np.ndarray], list[str], tuple[str, ...]]:
    """Parse a UCR/UEA `.ts` file: per instance a `[time, channels]` array and its class label.

    Returns (series, labels, class_names). Each instance is one line after
    `@data`: channels separated by ':', values by ',', the label last.
    """
    series: list[np.ndarray] = []
    labels: list[str] = []
    class_names: tuple[str, ...] = ()
    in_data = False
    with open(path, encoding="utf-8") as handle:
        for raw in handle:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            lower = line.lower()
            if lower.startswith("@classlabel"):
                parts = line.split()
                class_names = tuple(parts[2:]) if len(parts) > 2 and parts[1] == "true" else ()
            elif lower.startswith("@data"):
                in_data = True
            elif in_data:
                *channels, label = line.split(":")
                values = [np.array([float(v) for v in ch.split(",")]) for ch in channels]
                series.append(np.stack(values, axis=1).astype(np.float32))
                labels.append(label.strip())
    if not series:
        raise ExportError(f"{path}: no instances after @data; is it a .ts file?")
    return series, labels, class_names


def load_vowels(seed: int = 0) -> Dataset:
    """JapaneseVowels: classify the speaker at every step of an utterance (UCI, via sktime)."""
    folder = sktime_data_dir() / "JapaneseVowels"
    train_x, train_y, classes = read_ts(folder / "JapaneseVowels_TRAIN.ts")
    test_x, test_y, _ = read_ts(folder / "JapaneseVowels_TEST.ts")
    index = {c: i for i, c in enumerate(classes)}

    def build(xs: list[np.ndarray], ys: list[str], prefix: str) -> SequenceSet:
        inputs, lengths = _pad(xs)
        targets = np.zeros(inputs.shape[:2], dtype=np.int64)
        for n, y in enumerate(ys):
            targets[n, : lengths[n]] = index[y]
        keys = tuple(f"{prefix}-{n:04d}" for n in range(len(xs)))
        return SequenceSet(inputs=inputs, targets=targets, lengths=lengths, keys=keys)

    pool = build(train_x, train_y, "train-utterance")
    train, val = _split_stratified(pool, np.array([index[y] for y in train_y]), 0.2, seed)
    return Dataset(
        name="vowels",
        task="classification",
        features=tuple(f"lpc_{i + 1}" for i in range(train_x[0].shape[1])),
        train=train,
        val=val,
        test=build(test_x, test_y, "utterance"),
        labels=classes,
        description="JapaneseVowels (UCI via sktime): 9 speakers, 12 LPC coefficients per frame",
    )


def load_motions(seed: int = 0) -> Dataset:
    """BasicMotions: forecast the next 6-axis accelerometer + gyroscope reading."""
    folder = sktime_data_dir() / "BasicMotions"
    train_x, _, _ = read_ts(folder / "BasicMotions_TRAIN.ts")
    test_x, _, _ = read_ts(folder / "BasicMotions_TEST.ts")
    names = ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")
    pool = _forecast_set([x for x in train_x], "train-recording")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pool))
    n_val = max(1, len(pool) // 5)
    return Dataset(
        name="motions",
        task="regression",
        features=names,
        train=pool.subset(order[n_val:]),
        val=pool.subset(order[:n_val]),
        test=_forecast_set([x for x in test_x], "recording"),
        targets=names,
        description="BasicMotions (UEA via sktime): smartwatch accelerometer and gyroscope, 10 Hz",
    )


def load_synthetic(seed: int = 0, streams: int = 480, steps: int = 300) -> Dataset:
    """The synthetic fleet: forecast every sensor's next value, devices split 70/15/15.

    Many short streams rather than a few long ones: every device has its own
    period, loadings and offsets, and a model trained on a few dozen devices
    learns those devices instead of the task (validation loss rises early).
    """
    source = SyntheticStreams(streams=streams, seed=seed)
    series = source.generate(steps)
    pool = SequenceSet(
        inputs=series.values[:, :-1],
        targets=series.values[:, 1:],
        lengths=np.full(streams, steps - 1, dtype=np.int64),
        keys=source.stream_ids,
        periods=series.periods.astype(np.int64),
    )
    train, val, test = _split_streams(pool, seed)
    return Dataset(
        name="synthetic",
        task="regression",
        features=source.feature_names,
        train=train,
        val=val,
        test=test,
        targets=source.feature_names,
        description=f"pipeline.devtools.synthetic: {streams} devices x {steps} steps, seed {seed}",
    )


def text_vocabulary() -> tuple[str, ...]:
    """Id 0 is `<unk>` (any character outside the set), 1 is a newline, then printable ASCII."""
    return ("<unk>", "\n", *(chr(c) for c in range(32, 127)))


def encode_text(text: str) -> np.ndarray:
    """Character ids under `text_vocabulary()`, int64."""
    index = {ch: i for i, ch in enumerate(text_vocabulary())}
    return np.array([index.get(ch, 0) for ch in text], dtype=np.int64)


def load_text(seed: int = 0, chunk: int = 256, max_chunks: int = 1200) -> Dataset:
    """Characters of CPython's own documentation (`pydoc_data.topics`, shipped with Python).

    Each help topic is cut into streams of `chunk + 1` characters (a
    conversation per key). Topics, not chunks, are split 70/15/15, so the
    held-out text comes from topics the model never read. At most
    `max_chunks` streams are kept, chosen at random but spread over all
    topics, to bound training time.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip it from their Python
        raise ExportError(
            "this Python has no pydoc_data (CPython's documentation topics); use a full Python"
        ) from exc
    rng = np.random.default_rng(seed)
    names = sorted(topics)
    order = rng.permutation(len(names))
    n_hold = max(1, len(names) * 15 // 100)
    groups = {
        "test": [names[i] for i in order[:n_hold]],
        "val": [names[i] for i in order[n_hold : 2 * n_hold]],
        "train": [names[i] for i in order[2 * n_hold :]],
    }
    splits = {}
    for split_name, topic_names in groups.items():
        rows, keys = [], []
        for topic in topic_names:
            ids = encode_text(topics[topic])
            for k in range(len(ids) // (chunk + 1)):
                rows.append(ids[k * (chunk + 1) : (k + 1) * (chunk + 1)])
                keys.append(f"{topic}-{k:03d}")
        limit = max_chunks if split_name == "train" else max(1, max_chunks * 15 // 70)
        keep = np.sort(rng.permutation(len(rows))[:limit])
        tokens = np.stack([rows[i] for i in keep])
        splits[split_name] = SequenceSet(
            inputs=tokens[:, :-1, None],
            targets=tokens[:, 1:],
            lengths=np.full(len(keep), chunk, dtype=np.int64),
            keys=tuple(keys[i] for i in keep),
        )
    return Dataset(
        name="text",
        task="next_token",
        features=("char",),
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        labels=text_vocabulary(),
        description="CPython documentation topics (pydoc_data), one character per step",
    )


def _forecast_set(series: list[np.ndarray], prefix: str) -> SequenceSet:
    """Inputs x[0..L-2], targets x[1..L-1]: forecast the next value of every channel."""
    inputs, lengths = _pad([s[:-1] for s in series])
    targets, _ = _pad([s[1:] for s in series])
    keys = tuple(f"{prefix}-{n:04d}" for n in range(len(series)))
    return SequenceSet(inputs=inputs, targets=targets, lengths=lengths, keys=keys)


def _pad(series: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(s) for s in series], dtype=np.int64)
    out = np.zeros((len(series), int(lengths.max()), series[0].shape[1]), dtype=np.float32)
    for n, s in enumerate(series):
        out[n, : len(s)] = s
    return out, lengths


def _split_streams(pool: SequenceSet, seed: int) -> tuple[SequenceSet, SequenceSet, SequenceSet]:
    order = np.random.default_rng(seed).permutation(len(pool))
    n_test = n_val = max(1, len(pool) * 15 // 100)
    return (
        pool.subset(np.sort(order[n_test + n_val :])),
        pool.subset(np.sort(order[n_test : n_test + n_val])),
        pool.subset(np.sort(order[:n_test])),
    )


def _split_stratified(
    pool: SequenceSet, classes: np.ndarray, fraction: float, seed: int
) -> tuple[SequenceSet, SequenceSet]:
    rng = np.random.default_rng(seed)
    val_rows: list[int] = []
    for c in np.unique(classes):
        rows = np.nonzero(classes == c)[0]
        val_rows.extend(rng.choice(rows, size=max(1, round(len(rows) * fraction)), replace=False))
    val_index = np.sort(np.array(val_rows))
    train_index = np.setdiff1d(np.arange(len(pool)), val_index)
    return pool.subset(train_index), pool.subset(val_index)
