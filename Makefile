# make demo: set up and run the offline CPU demo (a named DVC experiment); make test: set up and run the tests.
SHARED ?= ../shared
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
OFFLINE := HF_HUB_CACHE=$(abspath $(SHARED))/hf/hub HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: setup demo paper compare seeds test lint shared strace
# dvc plots show writes a page that renders offline: Vega's scripts inlined in its template (npm pack, pinned).
setup: $(VENV)/.installed
	@$(PY) -m duel.offline_plots

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

shared:
	@test -f $(SHARED)/data/imdb/train.parquet -a -f $(SHARED)/data/imdb/test.parquet -a -d $(SHARED)/hf/hub || { \
	  echo "error: the offline demo needs $(SHARED)/data/imdb/{train,test}.parquet and the hub cache $(SHARED)/hf/hub" \
	       "(tokenizer + config of both models); put them there or pass SHARED=/path/to/shared"; exit 1; }

demo: setup shared
	@dvc exp remove -q demo 2>/dev/null || true
	$(OFFLINE) $(PY) -m duel.profile profiles/demo.yaml -S data.source=$(abspath $(SHARED))/data/imdb
	@grep -h '^> \*\*Warning' reports/report.md | sed 's/^> //; s/\*\*//g' || true
	@sed -n '/^## Quality/,/^## The paper/p' reports/report.md | grep '^|'
	@echo "demo: report in reports/report.md, metrics in metrics/; 'make compare' sets experiments side by side," \
	      "'dvc plots show' draws the curves; 'git checkout params.yaml' returns to the paper's params"

# The experiments side by side: changed params and each model's headline figures (dvc exp show has them all).
compare: setup
	@$(PY) -m duel.compare

# A seed study of the workspace's params: N runs differing in seeds.$(VARY) only, JOBS at a time, then the gap between
# the models against the seed-to-seed spread in studies/seeds-$(VARY)/report.md. ARGS="-S key=value ..." goes to
# every run.
N ?= 3
VARY ?= train
JOBS ?= 1
seeds: setup
	$(OFFLINE) $(PY) -m duel.seeds queue $(N) --vary $(VARY) --jobs $(JOBS) $(ARGS)
	$(PY) -m duel.seeds report --vary $(VARY)

paper: setup
	@dvc exp remove -q paper 2>/dev/null || true
	$(PY) -m duel.profile profiles/paper.yaml

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The DAG test traces the files each stage opens with strace (in Debian's base image; installed when missing).
strace:
	@command -v strace >/dev/null || { apt-get update -qq && apt-get install -y -qq strace >/dev/null; }

test: setup shared lint strace
	$(OFFLINE) $(PY) -m pytest -q -ra
