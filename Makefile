# The two commands of the README, and their parts.
#   make demo   the main job end to end (train, export, local Kafka, serve, predictions, metrics)
#   make test   set up everything, start the local broker, run every check and test, stop it
#   make bench  the benchmark against the hand-written baseline (docs/benchmarks.md)
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.ONESHELL:

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The deployment tools, built from the Go module proxy into $(TOOLS) (tests/unit/deploy).
TOOLS := .tools
KUSTOMIZE_VERSION ?= v5.8.0
KUBECONFORM_VERSION ?= v0.8.0
KUBE_SCORE_VERSION ?= v1.20.0

.PHONY: demo setup tools test lint unit integration contract faults chaos wheel bench kafka-start kafka-stop registry-start registry-stop lock clean

# The main job end to end: needs the environment only, not the deployment tools.
demo: $(STAMP)
	bash scripts/demo.sh

# The virtual environment, installed from the lock (constraints.txt) so that every
# machine gets the same versions. Rebuilt only when pyproject.toml or the lock change;
# pip's own cache makes a rebuild on the same machine quick.
$(STAMP): pyproject.toml constraints.txt
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[export,test,fast,registry,bench]'
	touch $(STAMP)

setup: $(STAMP) tools

# Programs the deployment tests run (tests/unit/deploy, tests/integration/test_prometheus.py):
# Prometheus and promtool from Debian's `prometheus` package (installed here when run as
# root, else named), and kustomize, kubeconform and kube-score, built with the machine's
# Go from the Go module proxy into $(TOOLS): kustomize 135 s, kubeconform 9 s, kube-score
# 78 s, cold, on the 2-core development VM (`rm -rf .tools; GOMODCACHE=$(mktemp -d)
# GOCACHE=$(mktemp -d) time make tools`).
tools: $(TOOLS)/.kustomize-$(KUSTOMIZE_VERSION) $(TOOLS)/.kubeconform-$(KUBECONFORM_VERSION) \
       $(TOOLS)/.kube-score-$(KUBE_SCORE_VERSION)
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus
	  else
	    echo "make tools: the deployment tests need prometheus and promtool:" \
	      "sudo apt-get install prometheus (Debian/Ubuntu)" >&2
	  fi
	fi

# $(call go-tool,module@version): go install into $(TOOLS), or say what is missing.
define go-tool
	@if command -v go >/dev/null; then
	  mkdir -p $(TOOLS) && GOBIN=$(abspath $(TOOLS)) go install $(1)
	  touch $@
	else
	  echo "make tools: the deployment tests need $(1): install Go, then make tools" >&2
	fi
endef

$(TOOLS)/.kustomize-$(KUSTOMIZE_VERSION):
	$(call go-tool,sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION))

$(TOOLS)/.kubeconform-$(KUBECONFORM_VERSION):
	$(call go-tool,github.com/yannh/kubeconform/cmd/kubeconform@$(KUBECONFORM_VERSION))

$(TOOLS)/.kube-score-$(KUBE_SCORE_VERSION):
	$(call go-tool,github.com/zegl/kube-score/cmd/kube-score@$(KUBE_SCORE_VERSION))

lint: setup
	$(BIN)/ruff check pipeline export tests bench
	$(BIN)/ruff format --check pipeline export tests bench
	$(BIN)/mypy

unit: setup
	$(BIN)/python -m pytest tests/unit

# Uses $$KAFKA_BOOTSTRAP_SERVERS and $$SCHEMA_REGISTRY_URL when set; otherwise the fixtures
# start the local broker and the local Schema Registry. Events "from elsewhere" are written
# by kcat (Debian's `kcat`). The whole suite runs once per Kafka client (`--transport`);
# both must pass.
integration: setup
	status=0
	$(BIN)/python -m pytest tests/integration --transport kafka-python || status=1
	$(BIN)/python -m pytest tests/integration --transport confluent || status=1
	exit $$status

# The transport contract (tests/contract): one battery against the in-memory fake the
# loop's unit tests use and both real Kafka clients, so the fake is held to what they do.
contract: setup
	$(BIN)/python -m pytest tests/contract

# The bounded fault campaign (tests/chaos, a few minutes): a kill loop, a pause past the
# session timeout and a broker restart under each guarantee, on a broker of its own.
faults: setup
	$(BIN)/python -m pytest tests/chaos

# The full fault campaign: every scenario (kill -9, SIGSTOP, 1 -> 3 -> 1 replicas, broker
# restarts, network cuts) x guarantee x transport, 200 faults, about 40 minutes. Writes
# artifacts/chaos/campaign.json and campaign.md (the table in docs/durability.md).
chaos: setup
	$(BIN)/python -m tests.chaos.campaign --full --out artifacts/chaos

# The wheel, built and installed into a fresh virtual environment outside the checkout,
# starts the local broker, serves and stops it from there (tests/wheel).
wheel: setup
	$(BIN)/python -m pytest tests/wheel

# The benchmark: throughput (also as a share of a passthrough: consume, produce the same
# bytes, commit), latency against load and the latency added over a plain reader of the
# input (the floor), CPU and memory of `hiddenstate serve` (both transports) and of the
# hand-written baseline, the restore rate, and the profiles. About 30 minutes; writes
# artifacts/bench/, docs/benchmark-latency.png and docs/benchmark-latency-added.png.
# `make bench BENCH_ARGS=--quick`: the run.py part in a few minutes (one run, short
# stages). Uses $$KAFKA_BOOTSTRAP_SERVERS when set, else the local broker (started if
# needed, left running).
BENCH_ARGS ?=
bench: setup
	export KAFKA_BOOTSTRAP_SERVERS=$${KAFKA_BOOTSTRAP_SERVERS:-$$($(BIN)/hiddenstate kafka start)}
	$(BIN)/python bench/run.py --bootstrap-servers $$KAFKA_BOOTSTRAP_SERVERS \
	  --out artifacts/bench/bench.json --plot docs/benchmark-latency.png $(BENCH_ARGS)
	case " $(BENCH_ARGS) " in *" --quick "*) exit 0;; esac
	$(BIN)/python bench/restore.py --bootstrap-servers $$KAFKA_BOOTSTRAP_SERVERS \
	  --streams 1000000 --runs 3
	$(BIN)/python bench/measure_state_store.py --streams 1000000
	for transport in kafka-python confluent; do
	  $(BIN)/python bench/stage_profile.py --bootstrap-servers $$KAFKA_BOOTSTRAP_SERVERS \
	    --transport $$transport
	done

kafka-start: setup
	$(BIN)/hiddenstate kafka start

kafka-stop: setup
	$(BIN)/hiddenstate kafka stop

registry-start: setup
	$(BIN)/hiddenstate registry start

registry-stop: setup
	$(BIN)/hiddenstate registry stop

# Everything, on a fresh machine: environment, broker, Schema Registry, lint, unit,
# integration and wheel tests. The local broker and registry are stopped afterwards even
# when a step fails (unless they ran before).
test: setup
	status=0
	cleanup=""
	trap 'eval "$$cleanup"' EXIT
	if [ -z "$${KAFKA_BOOTSTRAP_SERVERS:-}" ]; then
	  $(BIN)/hiddenstate kafka status >/dev/null || cleanup="$$cleanup $(BIN)/hiddenstate kafka stop;"
	  export KAFKA_BOOTSTRAP_SERVERS=$$($(BIN)/hiddenstate kafka start)
	fi
	if [ -z "$${SCHEMA_REGISTRY_URL:-}" ]; then
	  $(BIN)/hiddenstate registry status >/dev/null || cleanup="$$cleanup $(BIN)/hiddenstate registry stop;"
	  export SCHEMA_REGISTRY_URL=$$($(BIN)/hiddenstate registry start)
	fi
	$(MAKE) --no-print-directory lint || status=1
	$(MAKE) --no-print-directory unit || status=1
	$(MAKE) --no-print-directory integration || status=1
	$(MAKE) --no-print-directory contract || status=1
	$(MAKE) --no-print-directory wheel || status=1
	$(MAKE) --no-print-directory faults || status=1
	exit $$status

# Re-resolve the newest allowed versions and write them to the lock.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q -e '.[export,test,fast,registry,bench]'
	{ echo "# The versions CI installs. Regenerate with: make lock"; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^hiddenstate'; } > constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) $(TOOLS) .kafka .registry artifacts .pytest_cache .mypy_cache .ruff_cache
