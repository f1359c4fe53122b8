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

up: setup-core
	.venv/bin/flead up

down:
	.venv/bin/flead down

status:
	.venv/bin/flead status

clean:
	-.venv/bin/flead down
	rm -rf var
