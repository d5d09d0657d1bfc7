"""The data sets read from the installed sktime wheel and from Python itself, without downloads."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.data import encode_text, load_dataset, read_ts, text_vocabulary


def test_ts_parser_reads_channels_lengths_and_labels(tmp_path: Path) -> None:
    path = tmp_path / "tiny.ts"
    path.write_text(
        "# comment\n@problemName tiny\n@classLabel true a b\n@data\n1,2,3:4,5,6:a\n7,8:9,10:b\n",
        encoding="utf-8",
    )
    series, labels, classes = read_ts(path)
    assert [s.shape for s in series] == [(3, 2), (2, 2)]
    np.testing.assert_array_equal(series[0][:, 1], [4, 5, 6])
    assert labels == ["a", "b"]
    assert classes == ("a", "b")


def test_japanese_vowels_has_nine_speakers_and_twelve_channels() -> None:
    data = load_dataset("vowels")
    assert data.task == "classification"
    assert data.labels == tuple(str(i) for i in range(1, 10))
    assert data.features == tuple(f"lpc_{i}" for i in range(1, 13))
    assert (len(data.train) + len(data.val), len(data.test)) == (270, 370)
    assert data.test.lengths.min() >= 7
    assert data.test.lengths.max() <= 29


def test_every_step_of_an_utterance_carries_its_speaker() -> None:
    data = load_dataset("vowels")
    first = data.train.targets[0, : data.train.lengths[0]]
    assert len(set(first.tolist())) == 1


def test_basic_motions_forecasts_the_next_reading_of_each_channel() -> None:
    data = load_dataset("motions")
    assert data.targets == ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")
    np.testing.assert_array_equal(data.test.targets[0, :-1], data.test.inputs[0, 1:])


def test_synthetic_split_keeps_devices_apart_and_knows_their_periods() -> None:
    data = load_dataset("synthetic", quick=True)
    assert not set(data.train.keys) & set(data.test.keys)
    assert data.test.periods is not None
    assert len(data.test.periods) == len(data.test)


def test_text_vocabulary_maps_unknown_characters_to_id_zero() -> None:
    vocabulary = text_vocabulary()
    ids = encode_text("a\n€")
    assert vocabulary[ids[0]] == "a"
    assert vocabulary[ids[1]] == "\n"
    assert ids[2] == 0


def test_text_holds_out_whole_topics() -> None:
    data = load_dataset("text", quick=True)
    topic = lambda key: key.rsplit("-", 1)[0]  # noqa: E731 - a one-off reading of the key
    assert not {topic(k) for k in data.train.keys} & {topic(k) for k in data.test.keys}
    assert data.train.inputs.dtype == np.int64
