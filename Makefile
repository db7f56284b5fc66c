# ddn-node: the two commands of the README are `make run` and `make test`.
.PHONY: setup run demo test test-fast soak bench lint clean

setup:
	@deploy/bootstrap.sh

# Set up if needed, then the demo: the node on SQLite + CPU + the bundled model, a local
# Orthanc as the PACS, the sample studies sent through it. Ctrl-C stops everything.
run: setup
	.venv/bin/ddn-node demo

demo: run

# The whole test suite (what CI runs through .ci/run), after the gate: on two processes
# (most of a test's time is spent waiting for a node, Orthanc or a peer), then the few
# tests that change what every test shares, alone.
test: setup lint
	.venv/bin/python -m pytest -q -n 2 --dist loadfile -m "not soak and not serial"
	.venv/bin/python -m pytest -q -m serial

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow"

# Long fault, load and fuzz variants.
soak: setup
	.venv/bin/python -m pytest -q -m soak -o addopts=""

bench: setup
	.venv/bin/ddn-node bench all

# The gate: ruff (the rule set in pyproject.toml, formatting included) and mypy over ddn_node.
lint: setup
	.venv/bin/ruff format --check ddn_node tests
	.venv/bin/ruff check ddn_node tests
	.venv/bin/mypy

clean:
	rm -rf var .pytest_cache
