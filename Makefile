# make demo | make test | make bench | make mutants | make lab — each creates .venv and installs d2lite when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# the offline copy of Fashion-MNIST beside the checkout, when there is one (absolute: notebooks
# run in their own directories)
ifneq ($(wildcard ../shared/data/FashionMNIST),)
D2LITE_DATA ?= $(abspath ../shared/data)
endif
export D2LITE_DATA

DEMO_ARGS ?=

.PHONY: demo test bench mutants lab install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[course,test,cluster]"
	touch $@

demo: install
	$(VENV)/bin/d2lite compare --out results $(DEMO_ARGS)

test: install
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/bench_batch_norm.py
	$(PY) benchmarks/bench_end_to_end.py
	$(PY) benchmarks/profile_step.py
	$(PY) benchmarks/bench_grading.py
	$(PY) benchmarks/bench_sync_batch_norm.py
	$(PY) benchmarks/blog_net.py

# every mutant of every reference solution against the test cells, and 5 killed ones per notebook
# graded through d2lite grade (as root: the sandbox); writes benchmarks/results/mutants.md
mutants: install
	$(PY) benchmarks/mutants.py --grade 5

lab: install
	$(VENV)/bin/jupyter lab chapters/batch_norm

clean:
	rm -rf results submitted autograded feedback gradebook.db .pytest_cache
