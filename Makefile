# make setup  – create/refresh the environments (idempotent: re-runs pip only when a pin file changed)
# make run    – main job: fetch data and extract the offline model panel on the default set, then run
#               notebooks/01-extraction.ipynb with papermill into runs/
# make test   – set up, then run the test suite and the notebook regression (nbval)
PYTHON ?= python3.11
VENV   := .venv
ENVS   ?= .envs
FAMILY_ENVS := sevenn
PARAMS ?= params/default.yml
PANEL  := chgnet-0.3.0 chgnet-0.2.0 chgnet-r2scan diep sevennet-0 sevennet-0-22may2024 sevennet-l3i5 sevennet-mf-0
PY := $(VENV)/bin/python

.PHONY: setup run extract notebooks smoke-notebooks test benchmark clean-envs

setup: $(VENV)/.stamp $(foreach e,$(FAMILY_ENVS),$(ENVS)/$(e)/.stamp)

$(VENV)/.stamp: requirements/main.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements/main.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

$(ENVS)/%/.stamp: requirements/%.txt pyproject.toml
	test -x $(ENVS)/$*/bin/python || $(PYTHON) -m venv $(ENVS)/$*
	$(ENVS)/$*/bin/pip install --quiet --disable-pip-version-check -r requirements/$*.txt
	$(ENVS)/$*/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

extract: setup
	$(VENV)/bin/umlip-latents datasets fetch
	for m in $(PANEL); do for l in last backbone; do \
	  $(VENV)/bin/umlip-latents extract --dataset default --model $$m --layer $$l || exit 1; done; done

NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]-*.ipynb))

notebooks: setup
	$(VENV)/bin/umlip-latents notebooks $(NOTEBOOKS) --params $(PARAMS) --out runs

# refresh the committed notebooks with the smoke parameters (what nbval checks)
smoke-notebooks: setup
	$(VENV)/bin/umlip-latents notebooks $(NOTEBOOKS) --params params/smoke.yml --in-place

run: extract notebooks

test: setup
	$(VENV)/bin/python -m pytest -q --durations=15 tests
	$(VENV)/bin/python -m pytest -q --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg notebooks

benchmark: setup
	mkdir -p benchmarks/results
	for b in benchmarks/*.py; do $(VENV)/bin/python $$b > benchmarks/results/$$(basename $$b .py).json || exit 1; done

clean-envs:
	rm -rf $(VENV) $(ENVS)
