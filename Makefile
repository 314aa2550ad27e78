# Developer entry points. `make test` works from a fresh clone: it builds .venv first.
#
#   make venv                 # .venv with specjax (editable) and pytest
#   make test [ARGS=-k engine] [WORKERS=2]
#   make demo [ARGS=--help]   # default benchmark on SmolLM2 (experiments/launch.py)
#   make clean                # build/test caches; `make distclean` also drops .venv

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
ARGS ?=

.PHONY: venv test demo clean distclean

venv: $(VENV)/.installed

# The stamp is touched only after a successful install, and is redone when the
# dependencies in pyproject.toml change.
$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e '.[test]'
	touch $@

# The interpret-mode Pallas kernel tests run in a process of their own: after the rest
# of the suite (hundreds of compiled programs in one process) XLA:CPU has crashed
# (SIGSEGV) compiling their references, while the same tests pass in a fresh process.
KERNEL_TESTS := tests/test_tree_attention_kernel.py
# The rest runs on this many pytest-xdist workers, a test file per worker at a time
# (module fixtures such as the prefilled SmolLM2 batch are built once): compilation is
# single-threaded, so two workers keep both cores of the CI machine busy. Files go out
# in collection order, longest first (tests/conftest.py LONGEST_FIRST), not xdist's
# most-tests-first. WORKERS=0 runs in this process.
WORKERS ?= 2

test: venv
	$(VPY) -m pytest -n $(WORKERS) --dist loadfile --no-loadscope-reorder $(ARGS) --ignore=$(KERNEL_TESTS)
	$(VPY) -m pytest $(KERNEL_TESTS) $(ARGS) || test $$? -eq 5

demo: venv
	$(VPY) -m experiments.launch $(ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
