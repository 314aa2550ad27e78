# Developer entry points. `make test` works from a fresh clone: it builds .venv first.
#
#   make venv                 # .venv with specjax (editable) and pytest
#   make test [ARGS=-k engine]
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

test: venv
	$(VPY) -m pytest $(ARGS)

demo: venv
	$(VPY) -m experiments.launch $(ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
