"""Test doubles shipped with the package, so that tests need neither Kafka nor PyTorch.

- `models`: `random_weights(...)` draws a small recurrent model (Elman RNN,
  GRU or LSTM); `NumpyStepModel` steps it in numpy; `write_onnx_step` writes
  it as a real step-contract ONNX file (needs the `onnx` package);
- `records`: `event_record(...)` / `event_records(...)` build `InputRecord`s
  from Python values, `prediction_values` decodes a batch's predictions, and
  `ManualClock` is a clock tests move by hand;
- `kafka`: `FakeKafka`, an in-memory broker with consumer groups,
  transactions and fencing, and the `Transport` over it that the loop's
  unit tests use (`tests/contract` checks it behaves like the real clients).
"""

from pipeline.testing.kafka import FakeKafka, FakeTransport
from pipeline.testing.models import (
    LayerWeights,
    NumpyStepModel,
    StepWeights,
    random_weights,
    write_onnx_step,
)
from pipeline.testing.records import ManualClock, event_record, event_records, prediction_values

__all__ = [
    "FakeKafka",
    "FakeTransport",
    "LayerWeights",
    "ManualClock",
    "NumpyStepModel",
    "StepWeights",
    "event_record",
    "event_records",
    "prediction_values",
    "random_weights",
    "write_onnx_step",
]
