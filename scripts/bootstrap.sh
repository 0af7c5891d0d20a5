#!/usr/bin/env bash
# Brings a machine (fresh Debian 12, as root) to the state the demo and the tests need:
# system packages, the Python venv at .venv with the project installed, the eBPF objects built,
# bpffs mounted. Idempotent: a second run only checks, so it is cheap to call every time.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Already done by the calling script in this process tree (test.sh -> lint.sh).
if [[ "${MESHACCEL_BOOTSTRAPPED:-}" == "1" ]]; then
    exit 0
fi

# One place for every Debian package the project needs at build and test time.
APT_PACKAGES=(
    clang llvm libbpf-dev libbpf1 bpftool      # build and inspect the eBPF objects
    make gcc libc6-dev linux-libc-dev          # bpf/Makefile, kernel uapi headers
    iproute2 iptables nftables conntrack       # netns/veth test "pods", the iptables baseline
    util-linux kmod procps iputils-ping tcpdump  # setpriv, mountpoint, modprobe, ps, ping
    # The benchmark (tests/bench): load generators and the server app. nginx-light's package
    # starts no server here (policy-rc.d); the benchmark runs its own nginx in the server pod.
    wrk iperf3 nginx-light
    golang-go                                  # datapath tests: a Go io.Copy (splice) proxy
)
VENV="$ROOT/.venv"
export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off PIP_NO_INPUT=1

step() { printf '==> %s\n' "$*"; }
die() { printf 'bootstrap: %s\n' "$*" >&2; exit 1; }

# Runs a noisy command with its output in a log, shown only if the command fails.
quietly() {
    local log
    log="$(mktemp -t meshaccel-bootstrap.XXXXXX)"
    if "$@" </dev/null >"$log" 2>&1; then
        rm -f "$log"
    else
        local rc=$?
        tail -n 80 "$log" >&2
        die "failed (exit $rc): $* (full log: $log)"
    fi
}

is_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" == "installed" ]]
}

# --- system packages --------------------------------------------------------------------------
wanted=("${APT_PACKAGES[@]}")
command -v python3 >/dev/null 2>&1 || wanted+=(python3)
# Debian's python3 has no ensurepip (so no working venv) without python3-venv.
if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    wanted+=(python3-venv)
fi
missing=()
for pkg in "${wanted[@]}"; do
    is_installed "$pkg" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    [[ "$(id -u)" == "0" ]] || die "run as root: missing Debian packages: ${missing[*]}"
    step "apt: installing ${missing[*]}"
    quietly apt-get update
    quietly apt-get install -y --no-install-recommends "${missing[@]}"
else
    step "apt: all ${#wanted[@]} packages present"
fi

# --- eBPF objects (before the Python install: they are linked into it as package data) ----------
if [[ -f bpf/Makefile ]]; then
    step "bpf: make -C bpf"
    make -s -C bpf </dev/null
else
    step "bpf: no bpf/Makefile yet, skipping the eBPF build"
fi

# --- Python venv ------------------------------------------------------------------------------
if [[ -x "$VENV/bin/python" ]] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    step "venv: $VENV is broken, recreating it"
    rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "python3 is $(python3 -V 2>&1); meshaccel needs 3.11 or newer"
    step "venv: creating $VENV with $(python3 -V 2>&1)"
    # Its pip (23.0 on Debian 12) is replaced by requirements/build.txt's below.
    python3 -m venv "$VENV"
fi

# The install is redone only when what it depends on changed: pyproject.toml, the pins in
# requirements/*.txt, and the set of files in the package folders (the strict editable install
# links files one by one, so a new module or a new object needs a relink; edits to existing
# files are seen at once).
fingerprint() {
    local dirs=() d
    for d in agent cli contract operator; do [[ -d "$d" ]] && dirs+=("$d"); done
    {
        sha256sum pyproject.toml requirements/build.txt requirements/runtime.txt \
            requirements/test.txt
        if ((${#dirs[@]})); then
            find "${dirs[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.py[co]' | LC_ALL=C sort
        fi
    } | sha256sum | cut -d' ' -f1
}
STAMP="$VENV/.meshaccel-install"
if [[ "$(cat "$STAMP" 2>/dev/null)" == "$(fingerprint)" ]] \
    && "$VENV/bin/python" -P -c 'import meshaccel.agent' >/dev/null 2>&1; then
    step "python: meshaccel and its test extra already installed in .venv"
else
    if [[ -f "$STAMP" ]]; then
        step "python: pyproject.toml, requirements/ or the package files changed, reinstalling"
    else
        step "python: requirements/*.txt and meshaccel into .venv (the first time takes a minute)"
    fi
    rm -f "$STAMP"  # an install that stops halfway is redone by the next run
    # The same pinned, hash-checked versions the images install (requirements/freeze.py writes
    # them): pip and setuptools first, then the runtime dependencies and the test tools, wheels
    # only; then the project itself with --no-deps, built with that setuptools (no build
    # isolation, so nothing is fetched unchecked).
    # -P: `python -m`/`-c` would put the repository first on sys.path, where the operator/
    # folder shadows the stdlib's `operator` module and breaks pip before it starts.
    hashed=(--require-hashes --only-binary=:all:)
    quietly "$VENV/bin/python" -P -m pip install "${hashed[@]}" -r requirements/build.txt
    quietly "$VENV/bin/python" -P -m pip install "${hashed[@]}" \
        -r requirements/runtime.txt -r requirements/test.txt
    # strict: a link tree under build/ that a .pth adds to sys.path. The default ("lenient")
    # mode uses an import hook for our folder->package mapping, which mypy cannot follow.
    quietly "$VENV/bin/python" -P -m pip install --no-deps --no-build-isolation -e . \
        --config-settings editable_mode=strict
    "$VENV/bin/python" -P -c 'import meshaccel.agent' \
        || die "meshaccel.agent is not importable after the install"
    # Offline: everything meshaccel[test] needs is pinned, at the installed version.
    "$VENV/bin/python" -P requirements/freeze.py --verify \
        || die "requirements/*.txt do not match pyproject.toml (above): requirements/freeze.py's
    docstring says how to pin a new or changed dependency"
    fingerprint >"$STAMP"
fi

bash "$ROOT/scripts/tools.sh"  # helm 3 and 4, kubectl into .venv/bin (the chart's tests)

# --- bpffs ------------------------------------------------------------------------------------
if mountpoint -q /sys/fs/bpf; then
    step "bpffs: mounted at /sys/fs/bpf"
elif [[ "$(id -u)" == "0" ]]; then
    step "bpffs: mounting at /sys/fs/bpf"
    mkdir -p /sys/fs/bpf
    mount -t bpf bpf /sys/fs/bpf
else
    step "bpffs: not mounted and not root, leaving it"
fi
