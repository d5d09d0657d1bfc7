import json

from pipeline.testing import ManualClock, event_record, event_records


def test_event_record_encodes_a_mapping_as_json_and_a_str_key_as_utf8():
    record = event_record("sensor-é", {"x": [1]}, offset=3)
    assert (record.key, json.loads(record.value), record.offset) == (
        "sensor-é".encode(),
        {"x": [1]},
        3,
    )


def test_event_records_number_offsets_per_partition_and_keep_a_key_on_one_partition():
    records = event_records([(f"k{i % 5}", {"x": [i]}) for i in range(40)], partitions=3)
    for partition in range(3):
        offsets = [r.offset for r in records if r.partition == partition]
        assert offsets == list(range(len(offsets)))
    by_key = {}
    for record in records:
        assert by_key.setdefault(record.key, record.partition) == record.partition


def test_the_manual_clock_moves_only_when_told():
    clock = ManualClock(start=5.0)
    clock.advance(2.5)
    assert clock() == 7.5
