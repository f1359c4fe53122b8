# The two commands of the README:
#   make demo   runs the whole pipeline on the embedded local default (set-up included)
#   make test   runs the test suite (set-up included); .ci/run calls it
.PHONY: setup setup-core demo test up down status bench clean

setup:
	bash orchestration/setup.sh all

setup-core:
	bash orchestration/setup.sh core

demo: setup
	.venv/bin/flead demo $(ARGS)

test: setup
	bash orchestration/run_tests.sh $(ARGS)

# every benchmark in turn, each writing artifacts/bench/<name>.json (ARGS=--quick: their quick versions)
BENCHMARKS = core produce units seasonality fleet_shape half_life injected aggregate wide evaluate sink dashboards stream
bench: setup
	mkdir -p artifacts/bench
	set -e; for name in $(BENCHMARKS); do \
		echo "== bench/$$name.py"; .venv/bin/python bench/$$name.py $(ARGS) --json artifacts/bench/$$name.json; \
	done

up: setup-core
	.venv/bin/flead up

down:
	.venv/bin/flead down

status:
	.venv/bin/flead status

clean:
	-.venv/bin/flead down
	rm -rf var
