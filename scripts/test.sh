#!/usr/bin/env bash
# The whole check: bootstrap, lint (ruff, mypy), every test under tests/, then the images built
# and tested (scripts/images.sh: about 2-3 minutes here).
# Exits non-zero if anything fails, or if pytest ran no test at all.
# Extra arguments go to pytest (for example: bash scripts/test.sh -k getsockopt -x); with
# arguments, the images are left out (a developer's partial run).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
export MESHACCEL_BOOTSTRAPPED=1
export PATH="$ROOT/.venv/bin:$PATH"

lint_rc=0
bash scripts/lint.sh || lint_rc=$?
if ((lint_rc)); then
    echo "==> lint failed (see above): this run exits non-zero whatever pytest reports"
fi

echo "==> pytest ${*:-tests/}"
pytest_rc=0
# No path given: pytest runs testpaths (tests/) from pyproject.toml.
python -m pytest -ra "$@" || pytest_rc=$?

if ((pytest_rc == 5)); then
    echo "test.sh: pytest ran no test (exit 5): that counts as a failure" >&2
    exit 1
fi
if ((pytest_rc)); then
    exit "$pytest_rc"
fi
if (($# == 0)); then
    echo "==> images: scripts/images.sh (build both Dockerfiles, test what was built)"
    bash scripts/images.sh
fi
exit "$lint_rc"
