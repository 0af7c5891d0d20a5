# Shortcuts for developers. The scripts are the source of truth (and what CI runs);
# nothing here is needed to build or test the project.
.PHONY: all bootstrap bpf lint test demo bench bench-quick clean images

all: test

bootstrap:
	bash scripts/bootstrap.sh

bpf:
	$(MAKE) -C bpf

lint:
	bash scripts/lint.sh

test:
	bash scripts/test.sh

demo:
	bash scripts/demo.sh

# The side-by-side benchmark (about 50 minutes; run it on a quiet machine) and its smoke variant.
bench:
	bash scripts/bench.sh

bench-quick:
	bash scripts/bench.sh --quick

# Both images built with buildah (offline: a debootstrap stand-in for the Python base), then
# tested as the chart runs them (about 2-3 minutes; scripts/test.sh runs it too).
images:
	bash scripts/images.sh

clean:
	-$(MAKE) -C bpf clean
	rm -rf .mypy_cache .ruff_cache .pytest_cache .hypothesis
