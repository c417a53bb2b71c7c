# Two commands for users: `make search` and `make test`. Both create .venv when missing.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1

.PHONY: setup test search lint bench clean

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

# Re-install only when the project's dependency list changes (fast when done).
$(STAMP): pyproject.toml | $(VPY)
	$(VPY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(VPY) -m pytest -q tests

search: setup
	$(VPY) run_search.py
	$(VPY) run_ensemble.py

lint: setup
	$(VPY) -m ruff check geopose_ray tests bench run_search.py run_ensemble.py

bench: setup
	$(VPY) bench/run_all.py --quick

clean:
	rm -rf $(VENV) .pytest_cache
