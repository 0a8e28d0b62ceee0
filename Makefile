# Every target runs inside .venv, created from constraints.txt by `make setup`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARCH ?= amd64

.PHONY: setup test lint proto bench dist dist-all center agent demo clean

$(BIN)/.ready: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# The hot loop compiled with mypyc beside its source; without a C compiler the source runs.
$(BIN)/.hot: $(BIN)/.ready elkeid_agent/framescan.py tools/compile_hot.py
	-tools/host-tools.sh hot
	$(BIN)/python tools/compile_hot.py
	touch $@

setup: $(BIN)/.ready $(BIN)/.hot

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: setup
	$(BIN)/ruff check elkeid_agent elkeid_center elkeid_plugin_sdk tests bench tools
	$(BIN)/mypy elkeid_agent

proto: setup
	$(BIN)/python tools/gen_proto.py

# Each bench prints its figures beside a named baseline measured in the same run.
bench: setup
	$(BIN)/python bench/transfer.py
	$(BIN)/python bench/plugins.py
	$(BIN)/python bench/outage.py --outage 60
	$(BIN)/python bench/churn.py
	$(BIN)/python bench/vs_go.py
	if ls dist/elkeid-agent-*-linux-amd64 >/dev/null 2>&1; then \
		$(BIN)/python bench/startup.py; else echo "bench/startup.py: run make dist first"; fi

# The whole system on this machine: center, agent, a demo plugin, a task, a shutdown.
# DEMO_ARGS="--keep" keeps its directory (config, agent work dir and log) afterwards.
demo: setup
	$(BIN)/python tools/demo.py $(DEMO_ARGS)

# Interactive: `make center` in one terminal, `make agent` in another. The center prints every
# record to its terminal and serves examples/plugins.json (the SDK's demo plugin); the agent
# logs to its terminal and to .work/center/agent-work/log/elkeid-agent.log.
# CENTER_PORT: the gRPC port; when it is taken the center picks a free one and says so.
CENTER_DIR := .work/center
CENTER_PORT ?= 6751
center: setup
	$(BIN)/elkeid-center serve --dir $(CENTER_DIR) --port $(CENTER_PORT) --files examples/files \
		--configs examples/plugins.json --sign

agent: setup
	@test -f $(CENTER_DIR)/agent.toml || { echo "run \`make center\` first (in another terminal)"; exit 1; }
	@echo "agent log: $(CENTER_DIR)/agent-work/log/elkeid-agent.log"
	@echo "status:    $(BIN)/elkeid-agent ctl status --config $(CENTER_DIR)/agent.toml"
	-$(BIN)/elkeid-agent doctor --config $(CENTER_DIR)/agent.toml
	PATH="$(abspath $(BIN)):$$PATH" ELKEID_LOG_STDERR=1 \
		$(BIN)/elkeid-agent run --config $(CENTER_DIR)/agent.toml

clean:
	rm -rf dist build/out

# Frozen executable + deb + rpm in dist/ (build/dist.sh: BUILD_VERSION, CERTS_DIR, PRODUCT_CONFIG).
# dist.sh installs its host tools itself (tools/host-tools.sh dist|dist-arm64).
dist: setup
	build/dist.sh $(ARCH)

dist-all: setup
	build/dist.sh amd64
	build/dist.sh arm64

# The host tools a target needs, installed (or named) before it starts: a test must not
# skip for a tool that a later fixture would install. dist.sh runs its own.
.PHONY: host-tools-test host-tools-demo
host-tools-test host-tools-demo:
	tools/host-tools.sh $(@:host-tools-%=%)
test: host-tools-test
demo: host-tools-demo
