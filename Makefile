# Two commands for a fresh clone:  `make demo`  and  `make test`.
# Everything lives in .venv; torch==2.13.0 (the CPU wheel) goes in first when no torch is there, because an
# unpinned torch pulls several GB of CUDA packages. A torch that is already installed is kept (pinned below).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TB := $(VENV)/bin/tokenbridge
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist
OUT ?= out

.PHONY: install data test demo bench repro ui-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	$(PY) -m pip install -c $(VENV)/constraints.txt -e '.[dev,fast,ui]'
	touch $@

# The embedded dataset: Fashion-MNIST from Debian's dataset-fashion-mnist package (see docs/data.md).
data:
	@if [ -f "$(FASHION_MNIST)/train-images-idx3-ubyte.gz" ] || [ -n "$$TOKENBRIDGE_FASHION_MNIST" ]; then :; \
	elif command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; }; \
	else echo "Fashion-MNIST not found: download its four idx .gz files and set TOKENBRIDGE_FASHION_MNIST=<folder>"; exit 1; fi

# pytest-xdist: one worker per core (at most 4); --dist loadgroup keeps the tests of the one torchrun together.
test: install data
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadgroup tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

demo: install data
	$(TB) reconstruct --out $(OUT)/reconstruct
	$(TB) sample --labels 0 1 2 3 4 5 6 7 8 9 --per-class 10 --out $(OUT)/samples --show-confidence --evaluate
	$(TB) sample --model fmnist-mar --labels 0 1 2 3 4 5 6 7 8 9 --per-class 10 --out $(OUT)/samples-mar --evaluate
	$(TB) sample --model fmnist-d2c --labels 0 1 2 3 4 5 6 7 8 9 --per-class 10 --out $(OUT)/samples-d2c --evaluate
	$(TB) sample --model fmnist-ar --labels 0 1 2 3 4 5 6 7 8 9 --per-class 10 --out $(OUT)/samples-ar --evaluate

bench: install
	$(PY) benchmarks/quantizer.py
	$(PY) benchmarks/heads.py
	$(PY) benchmarks/generators.py

# The demo page in a real headless browser (Debian's chromium): load, generate, screenshot -> docs/img/ui.png.
ui-check: install
	@command -v chromium >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -qq chromium >/dev/null 2>&1 || { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }; }
	$(PY) -m pip install -q -c $(VENV)/constraints.txt "selenium>=4.10"
	$(PY) tools/ui_check.py --out docs/img/ui.png

repro: install data
	$(TB) repro all --out docs/results --overwrite

clean:
	rm -rf $(OUT) .pytest_cache
