PY ?= python3

.PHONY: install lint test test-fast bench
install:
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e '.[all]'

lint:
	ruff check solver workers app cvxtune tests bench
	ruff format --check solver workers app cvxtune tests bench
	mypy
	lint-imports

test:
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow and not integration"

bench:
	$(PY) bench/solver.py
