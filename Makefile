# Shortcuts for the scripts that README.md documents; the scripts need nothing but bash.
.PHONY: run test bench image lint compose

run:
	scripts/run.sh

test:
	scripts/test.sh

image:
	scripts/build-image.sh

lint:
	.venv/bin/ruff check gateway tests bench && .venv/bin/ruff format --check gateway tests bench && .venv/bin/mypy gateway

bench:
	scripts/bench.sh

compose:
	scripts/compose-up.sh
