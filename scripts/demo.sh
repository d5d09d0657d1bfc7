#!/usr/bin/env bash
# `make demo`: the main job end to end on one machine.
#   train a GRU on real data shipped in a PyPI package -> export one ONNX step
#   -> local Kafka -> stream held-out events for many streams -> serve -> show
#   predictions arriving and the metrics.
set -euo pipefail
cd "$(dirname "$0")/.."

H=.venv/bin/hiddenstate
PY=.venv/bin/python
MODEL=artifacts/gru-vowels
TOPIC=demo-vowels-$(date +%s)  # a fresh topic per run: the demo shows this run only
PORT=${HIDDENSTATE_METRICS_PORT:-9108}
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "1/6 train: GRU speaker classifier on JapaneseVowels (UEA data shipped in sktime)"
$H train --out "$MODEL"

step "2/6 export: one ONNX step graph with its metadata, parity with PyTorch checked"
$H export "$MODEL"

step "3/6 start the local Kafka broker (Apache Kafka 4, KRaft, jars from Maven Central)"
BOOTSTRAP=$($H kafka start)

EVENTS=$(wc -l < "$MODEL/holdout-events.jsonl")
STREAMS=$($PY -c 'import json,sys; print(len({json.loads(l)["key"] for l in open(sys.argv[1])}))' "$MODEL/holdout-events.jsonl")
step "4/6 serve: one hidden state per stream, one onnxruntime step per event (log: artifacts/demo-serve.log)"
$H produce --topic "$TOPIC" --source "$MODEL/holdout-events.jsonl" --count 0 --partitions 4 \
  --bootstrap-servers "$BOOTSTRAP"
$H serve --model "$MODEL/model.onnx" --input-topic "$TOPIC" --output-topic "$TOPIC.predictions" \
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

step "5/6 stream: $EVENTS held-out events of $STREAMS utterances (one stream each) at 600 events/s"
$H produce --topic "$TOPIC" --source "$MODEL/holdout-events.jsonl" --rate 600 \
  --bootstrap-servers "$BOOTSTRAP" &
producer=$!
trap 'kill $producer $server 2>/dev/null || true' EXIT
# Every prediction is read as it arrives; 20 are shown, then p50 and p99 of all of them.
$H watch --topic "$TOPIC.predictions" --model "$MODEL/model.onnx" --count 20 --sample 97 \
  --from-beginning --summarize "$EVENTS" --bootstrap-servers "$BOOTSTRAP"
wait $producer

step "6/6 metrics: http://127.0.0.1:$PORT/metrics (also /healthz, /readyz)"
sleep 2
$PY - "$PORT" <<'PYTHON'
import sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families

body = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics").read().decode()
values = {s.name + str(sorted(s.labels.items())): s.value
          for f in text_string_to_metric_families(body) for s in f.samples}
get = lambda name, **labels: values.get(name + str(sorted(labels.items())), 0.0)
waves = get("hiddenstate_wave_size_count")
print(f"events                {get('hiddenstate_events_total'):>10.0f}")
print(f"predictions           {get('hiddenstate_predictions_total'):>10.0f}")
print(f"active streams        {get('hiddenstate_active_streams'):>10.0f}")
print(f"onnxruntime calls     {waves:>10.0f}   (mean wave {get('hiddenstate_wave_size_sum') / max(waves, 1):.1f} streams)")
print(f"inference             {1e6 * get('hiddenstate_inference_seconds_sum') / max(waves, 1):>10.0f} us per call (mean)")
PYTHON
kill -TERM $server && wait $server || true
trap - EXIT
printf '\nThe broker keeps running on %s; stop it with: %s kafka stop\n' "$BOOTSTRAP" "$H"
