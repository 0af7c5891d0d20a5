#!/usr/bin/env bash
# The local demo: two Istio-style pods with Envoy sidecars in network namespaces, the agent in
# standalone mode, traffic through iptables and then accelerated, a table and the counters.
# Everything it makes is removed at the end, also on Ctrl-C. Extra arguments go to the demo
# (for example: bash scripts/demo.sh --rounds 5 --seconds 5 --apps-too).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
exec "$ROOT/.venv/bin/python" -m tests.netlab.demo "$@"
