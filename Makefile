# Everything runs from a project-local virtual environment built from plain Python 3.11.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint format bench quality clean bench-large

# setup.py builds the C kernels: editing them reinstalls (and so recompiles).
$(STAMP): pyproject.toml setup.py $(wildcard src/mergesmith/native/*.c src/mergesmith/native/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# The ray extra too: the Ray backend's tests run on a local Ray cluster. Where Ray cannot
	# be installed (no wheel for this platform), they are skipped and pytest says why.
	$(PY) -m pip install -q -e '.[dev,ray]' || { \
	  echo "Ray could not be installed: its tests will be skipped"; \
	  $(PY) -m pip install -q -e '.[dev]'; }
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m mergesmith.demo
	@echo
	@echo "7. Is the merge any good? One seed of the quality benchmark (make quality runs five):"
	$(PY) examples/quality/run_quality.py --seeds 0 --out demo-output/quality --work demo-output/quality-work

test: $(STAMP)
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples
	MERGESMITH_REQUIRE_KERNELS=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples

format: $(STAMP)
	$(VENV)/bin/ruff format src tests bench examples
	$(VENV)/bin/ruff check --fix src tests bench examples

bench: $(STAMP)
	$(PY) bench/bench_ties.py

# The MLP benchmark (five seeds, ~1 min), then the language-model one (three seeds, ~20 min on
# 2 cores), compared with its stored run under the round-1 tie rule.
quality: $(STAMP)
	$(PY) examples/quality/run_quality.py
	$(PY) examples/quality_lm/run_quality_lm.py \
		--compare-with examples/quality_lm/results/index_rule.json

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info

# Base + 3 fine-tunes of 1B parameters (8 GB, generated once into bench/work/large/), TIES,
# linear, DARE-TIES and DELLA against mergekit from a cold and a warm page cache; dropping the
# cache needs root. Tables in bench/results/large/. `--only dare_ties` reruns one method.
bench-large: $(STAMP)
	$(PY) bench/bench_large.py
