# make setup  – create/refresh the environments (idempotent: re-runs pip only when a pin file changed)
# make run    – main job: fetch data and extract the offline model panel on the default set, then run
#               every notebook with papermill ($(PARAMS)) into runs/
# make test   – set up, then run the test suite and the notebook regression (nbval)
# make test-fast – the main-environment unit tests (no family environments, no training, no notebooks)
# make test-browser – build the site from the committed smoke-run notebooks and load every page
#               in headless Chromium (tests/browser; installs Debian's chromium if missing)
# make book   – set up, fetch data, run every notebook with papermill ($(PARAMS)) into $(BOOK_NOTEBOOKS),
#               generate the book's pages and build the site into _build/html (warnings are errors)
PYTHON ?= python3.11
VENV   := .venv
ENVS   ?= .envs
# the family environments: every `environment:` of models/families.yml but main (each has requirements/<name>.txt)
FAMILY_ENVS := $(sort $(filter-out main,$(shell sed -n 's/^  environment: *//p' models/families.yml)))
PARAMS ?= params/default.yml
PY := $(VENV)/bin/python
# the offline panel: registered models whose weights ship inside a wheel (read from the registry after setup)
PANEL = $(shell $(VENV)/bin/umlip-latents models keys --source wheel)

.PHONY: setup run extract notebooks smoke-notebooks test test-fast test-slow print-family-envs benchmark benchmark-reference clean-envs book book-notebooks book-js book-html \
        test-browser

setup: $(VENV)/.stamp $(foreach e,$(FAMILY_ENVS),$(ENVS)/$(e)/.stamp)

$(VENV)/.stamp: requirements/main.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements/main.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# A family environment records the sha256 of the pin file it was built from (.spec): when the pins
# change, it is rebuilt from scratch (no stale packages); when only the project moved (a fresh clone
# using a cached environment, see .ci/run), pip finds everything installed and re-points the
# editable install.
$(ENVS)/%/.stamp: requirements/%.txt pyproject.toml
	@spec=$$(sha256sum requirements/$*.txt | cut -c1-16); \
	  if [ -f $(ENVS)/$*/.spec ] && [ "$$(cat $(ENVS)/$*/.spec)" != "$$spec" ]; then \
	    echo "requirements/$*.txt changed: rebuilding $(ENVS)/$*"; rm -rf $(ENVS)/$*; fi
	test -x $(ENVS)/$*/bin/python || $(PYTHON) -m venv $(ENVS)/$*
	$(ENVS)/$*/bin/pip install --quiet --disable-pip-version-check -r requirements/$*.txt
	$(ENVS)/$*/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
	sha256sum requirements/$*.txt | cut -c1-16 > $(ENVS)/$*/.spec
	touch $@

extract: setup
	$(VENV)/bin/umlip-latents datasets fetch
	for m in $(PANEL); do for l in last backbone; do \
	  $(VENV)/bin/umlip-latents extract --dataset default --model $$m --layer $$l --workers auto || exit 1; done; done

NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]-*.ipynb))

notebooks: setup
	$(VENV)/bin/umlip-latents notebooks $(NOTEBOOKS) --params $(PARAMS) --out runs

# refresh the committed notebooks with the smoke parameters (what nbval checks)
smoke-notebooks: setup
	$(VENV)/bin/umlip-latents notebooks $(NOTEBOOKS) --params params/smoke.yml --in-place

run: extract notebooks

# what git sees (tracked changes and files neither tracked nor ignored), before and after a target:
# `make test` and `make book` must leave it as they found it (generated output is git-ignored)
TREE_STATE = git status --porcelain --untracked-files=all 2>/dev/null
TREE_BEFORE = .cache/tree-before-$@
define tree_unchanged
	@$(TREE_STATE) | diff $(TREE_BEFORE) - || { echo "make $@ changed what git sees (diff above): generated output must be git-ignored"; exit 1; }
endef

print-family-envs:
	@echo $(FAMILY_ENVS)

# main-environment unit tests only: no family environment, no model training, no notebooks (< 3 min)
test-fast: $(VENV)/.stamp
	$(VENV)/bin/python -m pytest -q -m "not slow and not gpu and not browser and not envs and not training" tests

# the slow-marked tests, left out of `make test` (released-size models: DPA-3.1-3M's 16 repflow layers,
# UMA-S-1.1 at 147 M parameters and its 1.2 GB file, uPET/PET-MAD at full width; about 10 min on 2 cores)
test-slow: setup
	$(VENV)/bin/python -m pytest -q --durations=15 -m slow tests

test: setup
	@mkdir -p .cache && $(TREE_STATE) > $(TREE_BEFORE)
	$(VENV)/bin/python -m pytest -q --durations=15 tests
	$(VENV)/bin/python -m pytest -q --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg notebooks
	$(MAKE) --no-print-directory test-browser
	$(tree_unchanged)

benchmark: setup
	mkdir -p benchmarks/results
	for b in benchmarks/*.py; do out=benchmarks/results/$$(basename $$b .py).json; \
	  $(VENV)/bin/python $$b > $$out.tmp && mv $$out.tmp $$out || exit 1; done

# commit this machine's reports as the book's reference measurements (each names its commit and CPU)
benchmark-reference:
	@ls benchmarks/results/*.json > /dev/null || { echo "no reports: run make benchmark first"; exit 1; }
	mkdir -p benchmarks/reference && cp benchmarks/results/*.json benchmarks/reference/

clean-envs:
	rm -rf $(VENV) $(ENVS)

# ---- the book (jupyter-book v1; see book/reproduce.md). Everything written here is git-ignored.
# executed notebooks the book shows; `make book-html BOOK_NOTEBOOKS=notebooks` uses the committed smoke runs
BOOK_NOTEBOOKS ?= book/_generated/executed
# MathJax and pako (chemiscope's gzip reader) from npm, copied into the site: no CDN at view time
BOOK_JS := .cache/book-js
BOOK_JS_PACKAGES := mathjax@3.2.2 pako@2.0.4
BOOK_JS_STAMP := $(BOOK_JS)/.stamp-$(shell echo $(BOOK_JS_PACKAGES) | tr ' @' '+-')

book: setup
	@mkdir -p .cache && $(TREE_STATE) > $(TREE_BEFORE)
	$(MAKE) --no-print-directory book-notebooks
	$(MAKE) --no-print-directory book-html
	$(tree_unchanged)

book-notebooks: setup
	$(VENV)/bin/umlip-latents datasets fetch
	$(VENV)/bin/umlip-latents notebooks $(NOTEBOOKS) --params $(PARAMS) --out $(BOOK_NOTEBOOKS)

book-js: $(BOOK_JS_STAMP)

$(BOOK_JS_STAMP):
	npm install --prefix $(BOOK_JS) --no-save --no-package-lock --no-audit --no-fund $(BOOK_JS_PACKAGES)
	rm -f $(BOOK_JS)/.stamp-*
	touch $@

book-html: setup book-js
	$(PY) -m umlip_latents.book --notebooks $(BOOK_NOTEBOOKS) --node-modules $(BOOK_JS)/node_modules
	$(VENV)/bin/jupyter-book build . -W --keep-going

# ---- the built site in a browser: every page of _build/html in headless Chromium (Debian's
# chromium + chromium-driver, installed here when missing); screenshots go to _build/screenshots
CHROMIUM_PACKAGES := chromium chromium-driver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

test-browser: setup book-js
	test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { $(SUDO) apt-get update && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends $(CHROMIUM_PACKAGES); }
	test -f book/_generated/chemiscope-pooling.json.gz || $(VENV)/bin/umlip-latents notebooks \
	  notebooks/04-cumulant-pooling.ipynb --params params/smoke.yml --out .cache/smoke-runs
	$(MAKE) --no-print-directory book-html BOOK_NOTEBOOKS=notebooks
	$(VENV)/bin/python -m pytest -q -m browser tests/browser
