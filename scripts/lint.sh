#!/usr/bin/env bash
# ruff (lint and format) and mypy over the Python packages and the tests. Runs all three, fails
# if any fails. `ruff format` (without --check) rewrites what the format check refuses.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
export PATH="$ROOT/.venv/bin:$PATH"

# The import packages that exist in this tree (folder -> import name, as in pyproject.toml).
packages=()
[[ -f agent/__init__.py ]] && packages+=(-p meshaccel.agent)
[[ -f contract/__init__.py ]] && packages+=(-p meshaccel.contract)
[[ -f cli/__init__.py ]] && packages+=(-p meshaccel.cli)
[[ -d operator ]] && packages+=(-p meshaccel.operator)
[[ -f tests/__init__.py ]] && packages+=(-p tests)

failed=()
echo "==> ruff check"
ruff check --output-format concise . || failed+=(ruff)
echo "==> ruff format --check"
ruff format --check . || failed+=(ruff-format)
echo "==> mypy ${packages[*]}"
# mypy reads the package through the editable link tree under build/: report the real paths.
mypy "${packages[@]}" | sed -E 's#^build/__editable__\.[^/]+/meshaccel/(agent|cli|contract|operator)/#\1/#' \
    || failed+=(mypy)

if ((${#failed[@]})); then
    echo "==> lint FAILED: ${failed[*]}"
    exit 1
fi
echo "==> lint passed"
