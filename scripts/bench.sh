#!/usr/bin/env bash
# The side-by-side benchmark: bootstrap (packages, venv, eBPF objects), the chart's Python
# extra, then python -m tests.bench. Arguments go to it (for example --quick, --rounds 7,
# --workloads http-keepalive-1,tcp-rr-1); results land in bench-results/<timestamp>/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[[ "$(id -u)" == "0" ]] || { echo "bench.sh: run as root (netns, cgroups, eBPF)" >&2; exit 1; }
bash scripts/bootstrap.sh
if ! "$ROOT/.venv/bin/python" -c 'import matplotlib' >/dev/null 2>&1; then
    echo "==> python: pip install -e '.[test,bench]' (matplotlib, for the chart)"
    "$ROOT/.venv/bin/python" -m pip install --quiet -e ".[test,bench]" \
        --config-settings editable_mode=strict
fi
exec "$ROOT/.venv/bin/python" -m tests.bench "$@"
