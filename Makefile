# Shortcuts for developers. The scripts are the source of truth (and what CI runs);
# nothing here is needed to build or test the project.
.PHONY: all bootstrap bpf lint test demo clean

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

clean:
	-$(MAKE) -C bpf clean
	rm -rf .mypy_cache .ruff_cache .pytest_cache .hypothesis
