#!/usr/bin/env bash
# The visible demo, for now: the kernel datapath scenarios (real eBPF programs, network
# namespaces as pods), run verbosely. Extra arguments go to pytest.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
if [[ ! -d tests/datapath ]]; then
    echo "demo.sh: tests/datapath does not exist yet: nothing to show" >&2
    exit 1
fi
exec "$ROOT/.venv/bin/python" -m pytest -v -ra tests/datapath "$@"
