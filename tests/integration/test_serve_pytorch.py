"""Through Kafka, the served predictions are PyTorch's: the ONNX file's parity, end to end."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the offline extra (torch) is not installed")

from export import ModelInfo, NetConfig, RecurrentNet, export_onnx  # noqa: E402


@pytest.mark.parametrize("cell", ["lstm", "rnn_tanh"])
def test_served_predictions_equal_pytorch_stepping_each_stream(kafka, serve, tmp_path, cell):
    torch.manual_seed(7)
    net = RecurrentNet(
        NetConfig(cell=cell, task="classification", n_features=4, n_outputs=5, hidden=12, layers=2)
    ).eval()
    path = tmp_path / f"{cell}.onnx"
    export_onnx(
        net,
        path,
        ModelInfo(name=f"{cell}-e2e", task="classification", features=("a", "b", "c", "d")),
    )
    rng = np.random.default_rng(3)
    streams, steps = 12, 15
    xs = rng.normal(size=(streams, steps, 4)).astype(np.float32)
    sent = [
        (
            f"user-{i}".encode(),
            json.dumps({"x": dict(zip("abcd", xs[i, k].tolist(), strict=True))}).encode(),
        )
        for k in range(steps)
        for i in range(streams)
    ]
    source = kafka.create_topic("events", partitions=4)
    output = kafka.create_topic("predictions", partitions=4)
    kafka.produce(source, sent)

    served = serve("--model", str(path), "--input-topic", source, "--output-topic", output)
    records = kafka.consume(output, count=len(sent))
    served.stop()

    got: dict[bytes, list[list[float]]] = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        got[record.key].append(json.loads(record.value)["outputs"]["probs"])
    with torch.no_grad():
        for i in range(streams):
            state = net.initial_state(1)
            expected = []
            for k in range(steps):
                y, state = net.step(torch.from_numpy(xs[i, k : k + 1]), state)
                expected.append(y[0].tolist())
            np.testing.assert_allclose(got[f"user-{i}".encode()], expected, atol=1e-5)
