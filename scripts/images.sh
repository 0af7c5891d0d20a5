#!/usr/bin/env bash
# Build Dockerfile.agent and Dockerfile.operator exactly as written, with buildah, offline if need
# be, then test the built images (tests/images/test_built_images.py). As root, on Debian 12.
#
#   bash scripts/images.sh                 # build both, test them
#   bash scripts/images.sh --no-test       # build only
#   bash scripts/images.sh --base IMAGE    # build FROM IMAGE (e.g. python:3.11-slim-bookworm@sha256:...)
#
# Without --base, the real python:3.11-slim-bookworm is used when a registry answers; otherwise
# a local stand-in for it: Debian bookworm from debootstrap with Debian's Python 3.11 where the
# Dockerfiles look for it (python, pip on PATH; no "externally managed" marker, as in the
# official image; the machine's own CAs, from /usr/local/share/ca-certificates, are trusted
# in it too, so that a machine behind a TLS-inspecting proxy can build). Each image is saved as an OCI archive under .images/ (gitignored) and its size
# and digest printed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="$ROOT/.images"
STANDIN="localhost/meshaccel-python-base:3.11-bookworm"
OFFICIAL="docker.io/library/python:3.11-slim-bookworm"
MIRROR="http://deb.debian.org/debian"
base="" test=1

while (($#)); do
    case "$1" in
    --base) base="$2"; shift 2 ;;
    --no-test) test=0; shift ;;
    -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "images.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

step() { echo "==> $*"; }

if [[ $EUID -ne 0 ]]; then
    echo "images.sh: run as root (buildah builds and runs images here with chroot isolation)" >&2
    exit 1
fi
missing=()
for tool in buildah debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
    step "apt: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi
mkdir -p "$OUT"
VERSION="$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"

make_standin() {
    if buildah inspect --type image "$STANDIN" >/dev/null 2>&1; then
        return
    fi
    local rootfs="$OUT/base-rootfs"
    if [[ ! -x "$rootfs/usr/bin/python3.11" ]]; then
        step "base: debootstrap bookworm into $rootfs (a few minutes, once)"
        rm -rf "$rootfs"
        debootstrap --variant=minbase \
            --include=python3.11,python3.11-venv,python3-pip,ca-certificates \
            bookworm "$rootfs" "$MIRROR" >"$OUT/debootstrap.log" 2>&1 ||
            { tail -20 "$OUT/debootstrap.log" >&2; exit 1; }
    fi
    step "base: $STANDIN (the paths python:3.11-slim-bookworm has)"
    rm -f "$rootfs/usr/lib/python3.11/EXTERNALLY-MANAGED"
    ln -sf /usr/bin/python3.11 "$rootfs/usr/local/bin/python"
    ln -sf /usr/bin/python3.11 "$rootfs/usr/local/bin/python3"
    ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/pip"
    # A machine behind a TLS-inspecting proxy trusts its CA locally: so must the builds on it.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
    fi
    rm -rf "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"*
    local ctr mnt
    ctr="$(buildah from scratch)"
    mnt="$(buildah mount "$ctr")"
    cp -a "$rootfs/." "$mnt/"
    buildah umount "$ctr" >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd python3 "$ctr"
    buildah commit --rm --quiet "$ctr" "$STANDIN" >/dev/null
}

if [[ -z "$base" ]]; then
    if timeout 60 buildah pull --quiet "$OFFICIAL" >/dev/null 2>&1; then
        base="$OFFICIAL"
    else
        step "base: no registry answers: building a local stand-in for $OFFICIAL"
        make_standin
        base="$STANDIN"
    fi
fi

declare -A built
for component in agent operator; do
    tag="localhost/meshaccel-$component:$VERSION"
    step "build: Dockerfile.$component -> $tag (FROM $base)"
    started=$SECONDS
    buildah bud --quiet --isolation chroot --layers \
        --build-arg "PYTHON_IMAGE=$base" -f "Dockerfile.$component" -t "$tag" . >/dev/null
    archive="$OUT/meshaccel-$component-$VERSION.oci.tar"
    rm -f "$archive"
    buildah push --quiet "$tag" "oci-archive:$archive:$tag" >/dev/null
    size="$(buildah images --format '{{.Size}}' "$tag" | head -1)"
    digest="$(buildah images --digests --format '{{.Digest}}' "$tag" | head -1)"
    built[$component]="$tag"
    echo "    $tag: $size, $digest, built in $((SECONDS - started)) s, saved as $archive"
done

if ((test)); then
    # The images' own tests, then the agent's lifecycle tests with every agent started from the
    # image (tests/agent_lifecycle/harness.py): load, accelerate, adopt, uninstall, capabilities.
    step "test: the built images, and the agent's lifecycle tests run from its image"
    MESHACCEL_AGENT_IMAGE="${built[agent]}" MESHACCEL_OPERATOR_IMAGE="${built[operator]}" \
        "$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider \
        tests/images/test_built_images.py \
        tests/agent_lifecycle/test_agent.py tests/agent_lifecycle/test_capabilities.py
fi
