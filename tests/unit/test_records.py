from collections import namedtuple

from pipeline.records import BatchResult, InputRecord, OutputRecord

ConsumerRecord = namedtuple(
    "ConsumerRecord", ["topic", "partition", "offset", "timestamp", "key", "value", "headers"]
)


def test_an_input_record_is_made_from_a_kafka_consumer_record():
    polled = ConsumerRecord("events", 2, 41, 1_700, b"k", b"{}", [("trace", b"t")])
    assert InputRecord.from_kafka(polled) == InputRecord(
        "events", 2, 41, b"k", b"{}", 1_700, (("trace", b"t"),)
    )


def test_a_consumer_record_without_headers_gives_empty_headers():
    polled = ConsumerRecord("events", 0, 0, 0, None, None, None)
    assert InputRecord.from_kafka(polled).headers == ()


def test_a_record_names_its_position_as_topic_partition_offset():
    assert InputRecord("events", 3, 17, b"k", b"v", 0).where == "events[3]@17"


def test_outputs_are_predictions_then_dead_letters():
    prediction, letter = OutputRecord("p", b"a", b"1"), OutputRecord("d", b"a", b"2")
    assert BatchResult(predictions=[prediction], dead_letters=[letter]).outputs == [
        prediction,
        letter,
    ]
