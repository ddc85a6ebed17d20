# ARM — the two commands are `make run` and `make test`; both set everything up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
# Source folders put on the venv's path (a .pth file), so `python -m arm_registry` etc. work.
SRC_DIRS := libs/proto libs/common libs/client libs/cli services/registry services/governance services/telemetry services/allinone

.PHONY: setup run test proto proto-lint lint lock bench clean

$(STAMP): requirements.lock package.json package-lock.json Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "ARM needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -c 'import sysconfig, pathlib; root = pathlib.Path.cwd(); \
	  pth = pathlib.Path(sysconfig.get_paths()["purelib"]) / "arm-src.pth"; \
	  pth.write_text("".join(f"{root / d}\n" for d in "$(SRC_DIRS)".split()))'
	printf '#!%s\nfrom arm_cli.main import main\nmain()\n' "$(CURDIR)/$(PY)" > $(VENV)/bin/arm && chmod +x $(VENV)/bin/arm
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

setup: $(STAMP)

run: setup
	$(PY) -m arm_allinone

test: setup
	$(PY) -m pytest -n 2 --dist loadfile

proto: setup
	$(PY) scripts/gen_protos.py

proto-lint: setup
	cd proto && ../node_modules/.bin/buf lint

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

lock:
	$(PYTHON) -m venv /tmp/arm-lock-venv
	/tmp/arm-lock-venv/bin/pip install --quiet -r requirements.in
	/tmp/arm-lock-venv/bin/pip freeze > requirements.lock

bench: setup
	$(PY) bench/engine.py
	$(PY) bench/check_grpc.py
	$(PY) bench/floor.py
	$(PY) bench/resolve.py
	$(PY) bench/ingest.py

clean:
	rm -rf $(VENV) node_modules .arm
