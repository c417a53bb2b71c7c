# Two commands for users: `make search` and `make test`. Both create .venv when missing.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1

.PHONY: setup test search lint bench clean lock

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

# Every version comes from requirements.lock (docs/ENVIRONMENT.md); re-install only when the
# dependency list or the lock changes (fast when done), then check that pip kept to the lock.
$(STAMP): pyproject.toml requirements.lock | $(VPY)
	$(VPY) -m pip install -q -c requirements.lock -e ".[dev]"
	$(VPY) -c "$$LOCK_CHECK"
	touch $(STAMP)

# Installed versions == the lock's: catches a local build that passes `==` (torch 2.x.y+cpu from a
# find-links folder or the CPU index; beside PyPI's torchvision it fails with `torchvision::nms`).
define LOCK_CHECK
import re, sys
from importlib.metadata import distributions
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
pins = {}
for line in open("requirements.lock"):
    if re.match(r"[A-Za-z0-9]", line):
        name, version = line.split(";")[0].strip().split("==")
        pins[norm(name)] = version
got = {norm(d.metadata["Name"]): d.version for d in distributions()}
wrong = [f"{k}=={v} (lock: {pins[k]})" for k, v in sorted(got.items()) if k in pins and v != pins[k]]
loose = sorted(set(got) - set(pins) - {"pip", "geopose-ray"})
if loose:
    print("note: installed, not in requirements.lock:", ", ".join(loose), file=sys.stderr)
if wrong:
    sys.exit("not the versions of requirements.lock: " + ", ".join(wrong))
endef
export LOCK_CHECK

# Refresh requirements.lock after editing pyproject.toml's dependencies: keeps every pin that
# still fits; `make lock UPGRADE=--upgrade` (or UPGRADE="--upgrade-package torch") moves pins.
# Resolves from PyPI only (uv ignores pip.conf), for every platform (--universal). LOCK_OUT: .ci/run
# compiles a copy to check that the committed lock is not stale.
LOCK_OUT ?= requirements.lock
lock: | $(VPY)
	test -x $(VENV)/bin/uv || $(VPY) -m pip install -q -c requirements.lock uv
	$(VENV)/bin/uv pip compile -q pyproject.toml --universal --extra dev --extra postgres --extra dashboard \
	    --custom-compile-command "make lock" -o $(LOCK_OUT) $(UPGRADE)

setup: $(STAMP)

test: setup
	$(VPY) -m pytest -q --durations=30 tests

search: setup
	$(VPY) run_search.py
	$(VPY) run_ensemble.py

lint: setup
	$(VPY) -m ruff check geopose_ray tests bench run_search.py run_ensemble.py

bench: setup
	$(VPY) bench/run_all.py --quick

clean:
	rm -rf $(VENV) .pytest_cache
