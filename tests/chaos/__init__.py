"""The fault campaign: the guarantees under faults, checked by code that shares none of the server's.

    python -m tests.chaos.campaign --full      # make chaos: >= 200 faults, JSON + markdown
    pytest tests/chaos                         # the bounded campaign CI runs

A run starts a broker of its own (with a second listener behind a loopback
TCP proxy, so the network between server and broker can be cut), a
recording producer (librdkafka: every event it reports delivered, with its
partition and offset), and `hiddenstate serve` replicas as a StatefulSet
would run them (stable slots: the same metrics port, so the same
transactional id, after each restart). While events flow, faults come at
random moments: kill -9, SIGSTOP past the session timeout then SIGCONT,
1 -> 3 -> 1 replicas with kills, broker kill -9/start, network cuts. A final
restart sends one more event to every stream. Then the checker reads the
output, dead-letter and changelog topics with its own consumer and compares
every prediction with an independent reference that steps the exported ONNX
file with onnxruntime directly:

- `proxy.py`: the loopback TCP proxy (forward, cut, blackhole);
- `broker.py`: the campaign's own broker, stopped and started at will;
- `producer.py`: the recording producer;
- `reference.py`: the independent reference (onnxruntime on the ONNX file);
- `servers.py`: the replicas and their supervisor (restarts, hangs);
- `faults.py`: the scenarios;
- `checker.py`: the report of one run;
- `campaign.py`: scenarios x guarantees x transports, JSON and markdown.
"""
