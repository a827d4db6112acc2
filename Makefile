# The two commands of the README. Each installs what it needs into .venv first (once):
# the pinned torch before anything else (a bare `torch` requirement can pull a multi-GB build),
# then the project with its test extras.
#   make demo   the whole method (pool, HG-DPO, evaluation) on the embedded default (no GPU, no model hub)
#   make test   run the test suite

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install clean-venv

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) jobs/run.py --config examples/run.yaml

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: no tests were collected" >&2; exit 1; fi; exit $$rc

clean-venv:
	rm -rf $(VENV)
