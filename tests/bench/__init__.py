"""The side-by-side benchmark: iptables interception versus meshaccel, with real Envoy sidecars.

Run ``python -m tests.bench [--quick]`` as root (or ``make bench`` / ``make bench-quick``). It
builds a netlab node with a client pod and a server pod (Envoy sidecars, Istio's iptables), measures
every configuration (configs.py) on every workload (workloads.py) in interleaved rounds, and
writes ``bench-results/<timestamp>/`` (results.json, results.md, chart.png, profiles).
docs/benchmarks.md explains the method and holds the numbers.
"""
