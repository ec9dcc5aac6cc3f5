# The README's two commands: `make demo` and `make test`. Each sets up .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup browser demo test test-quick lint bench bench-quick clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch and torchvision are pinned as a pair that imports together (lpips needs torchvision).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m medldm.evaluation.demo

# The report test opens report.html in headless Chromium (Debian package `chromium`): installed once, as root
# with apt-get; where that cannot be done, a note says so and the test reports the missing browser itself.
browser:
	@command -v chromium >/dev/null || { \
	if command -v apt-get >/dev/null && [ "$$(id -u)" -eq 0 ]; then \
	(apt-get update -qq && apt-get install -y -qq chromium) \
	|| echo "warning: apt-get could not install chromium; the report test will fail or skip" >&2; \
	else echo "note: chromium is missing and cannot be installed here (needs apt-get as root);" \
	"install the Debian package chromium to run the report test" >&2; fi; }

# Tests run in JOBS worker processes (pytest-xdist; each uses one torch thread, tests/conftest.py), so that on 2
# cores one worker's imports, process start-ups and file work overlap the other's computing. JOBS=0: one process.
JOBS    ?= 2

# pytest exits 5 when it collected no test: a broken suite, reported as such.
test: $(STAMP) browser
	$(BIN)/python -m pytest -q -n $(JOBS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: no tests were collected" >&2; exit 1; fi; exit $$rc

# The quick lane for your own loop: every test not marked slow (CONTRIBUTING.md).
test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -n $(JOBS) -m "not slow"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: no tests were collected" >&2; exit 1; fi; exit $$rc

# Speed and memory (docs/performance.md): every benchmark prints a table and writes JSON to bench_output/.
bench: $(STAMP)
	$(BIN)/python -m benchmarks

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks --quick

# ruff and mypy are pinned in the dev extra, so their verdicts do not change under us. mypy's settings (the paths
# it checks included) are in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) demo_output bench_output .pytest_cache .mypy_cache
