#!/usr/bin/env bash
# `make demo`: the main job end to end on one machine.
#   train a GRU on real data shipped in a PyPI package -> export one ONNX step
#   -> local Kafka -> stream held-out events for many streams -> serve -> show
#   predictions arriving -> publish their truth (the held-out labels) -> the live
#   accuracy beside the held-out one from training, the metrics, one stream's state.
set -euo pipefail
cd "$(dirname "$0")/.."

H=.venv/bin/hiddenstate
PY=.venv/bin/python
MODEL=artifacts/gru-vowels
TOPIC=demo-vowels-$(date +%s)  # a fresh topic per run: the demo shows this run only
PORT=${HIDDENSTATE_METRICS_PORT:-9108}
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "1/7 train: GRU speaker classifier on JapaneseVowels (UEA data shipped in sktime)"
$H train --out "$MODEL"

step "2/7 export: one ONNX step graph with its metadata, parity with PyTorch checked"
$H export "$MODEL"

step "3/7 start the local Kafka broker (Apache Kafka 4, KRaft, jars from Maven Central)"
BOOTSTRAP=$($H kafka start)

EVENTS=$(wc -l < "$MODEL/holdout-events.jsonl")
STREAMS=$($PY -c 'import json,sys; print(len({json.loads(l)["key"] for l in open(sys.argv[1])}))' "$MODEL/holdout-events.jsonl")
step "4/7 serve: one hidden state per stream, one onnxruntime step per event (log: artifacts/demo-serve.log)"
for topic in "$TOPIC" "$TOPIC.labels"; do  # the labels co-partitioned with the events
  $H produce --topic "$topic" --source "$MODEL/holdout-events.jsonl" --count 0 --partitions 4 \
    --bootstrap-servers "$BOOTSTRAP"
done
$H serve --model "$MODEL/model.onnx" --input-topic "$TOPIC" --output-topic "$TOPIC.predictions" \
  --labels-topic "$TOPIC.labels" --streams-api \
  --bootstrap-servers "$BOOTSTRAP" --metrics-host 127.0.0.1 --metrics-port "$PORT" \
  >artifacts/demo-serve.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
# Ready (assigned, states restored) before the first event: a start is not latency.
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break
  kill -0 $server 2>/dev/null || { cat artifacts/demo-serve.log; exit 1; }
  sleep 0.5
done

step "5/7 stream: $EVENTS held-out events of $STREAMS utterances (one stream each) at 600 events/s"
$H produce --topic "$TOPIC" --source "$MODEL/holdout-events.jsonl" --rate 600 \
  --bootstrap-servers "$BOOTSTRAP" &
producer=$!
trap 'kill $producer $server 2>/dev/null || true' EXIT
# Every prediction is read as it arrives; 20 are shown, then p50 and p99 of all of them.
$H watch --topic "$TOPIC.predictions" --model "$MODEL/model.onnx" --count 20 --sample 97 \
  --from-beginning --summarize "$EVENTS" --bootstrap-servers "$BOOTSTRAP"
wait $producer

step "6/7 truth: the held-out labels, one per event ({\"step\": n, \"y\": speaker}), on $TOPIC.labels"
$H produce --topic "$TOPIC.labels" --source "$MODEL/holdout-labels.jsonl" \
  --bootstrap-servers "$BOOTSTRAP"

step "7/7 metrics: http://127.0.0.1:$PORT/metrics (also /healthz, /readyz, /streams)"
$PY - "$PORT" "$EVENTS" "$MODEL/metrics.json" <<'PYTHON'
import json, sys, time, urllib.request
from prometheus_client.parser import text_string_to_metric_families

port, labels, offline = sys.argv[1], int(sys.argv[2]), json.load(open(sys.argv[3]))["model"]

def read():
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    return {s.name + str(sorted((k, v) for k, v in s.labels.items() if k != "identity")): s.value
            for f in text_string_to_metric_families(body) for s in f.samples}

deadline = time.monotonic() + 60  # every label judged (they follow the last event closely)
while True:
    values = read()
    get = lambda name, **labels: values.get(name + str(sorted(labels.items())), 0.0)
    done = sum(get("hiddenstate_online_labels_total", result=r) for r in ("judged", "late", "unknown_step"))
    if done >= labels or time.monotonic() > deadline:
        break
    time.sleep(0.5)
waves = get("hiddenstate_wave_size_count")
print(f"events                {get('hiddenstate_events_total'):>10.0f}")
print(f"predictions           {get('hiddenstate_predictions_total'):>10.0f}")
print(f"active streams        {get('hiddenstate_active_streams'):>10.0f}")
print(f"onnxruntime calls     {waves:>10.0f}   (mean wave {get('hiddenstate_wave_size_sum') / max(waves, 1):.1f} streams)")
print(f"inference             {1e6 * get('hiddenstate_inference_seconds_sum') / max(waves, 1):>10.0f} us per call (mean)")
judged = get("hiddenstate_online_labels_total", result="judged")
print(f"labels judged         {judged:>10.0f}   (late {get('hiddenstate_online_labels_total', result='late'):.0f}, "
      f"unknown step {get('hiddenstate_online_labels_total', result='unknown_step'):.0f})")
print(f"live accuracy         {get('hiddenstate_online_correct_total') / max(judged, 1):>10.4f}   "
      f"held-out accuracy from training: {offline['accuracy']:.4f}")
print(f"live log-loss         {get('hiddenstate_online_log_loss_total') / max(judged, 1):>10.4f}   "
      f"held-out log-loss from training: {offline['log_loss']:.4f}")
PYTHON

KEY=utterance-0042
printf '\n$ curl -s http://127.0.0.1:%s/streams/%s?state=1\n' "$PORT" "$KEY"
curl -s "http://127.0.0.1:$PORT/streams/$KEY?state=1" | $PY -c '
import json, sys
stream = json.load(sys.stdin)
for name, tensor in stream.get("state", {}).items():  # 2 x 64 numbers: the first of each layer
    stream["state"][name] = [row[:4] + ["... %d more" % (len(row) - 4)] for row in tensor]
print(json.dumps(stream))'

kill -TERM $server && wait $server || true
trap - EXIT
printf '\nThe broker keeps running on %s; stop it with: %s kafka stop\n' "$BOOTSTRAP" "$H"
