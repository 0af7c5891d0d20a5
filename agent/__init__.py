"""meshaccel node agent: loads the eBPF datapath, owns its pinned maps, serves the operator."""
