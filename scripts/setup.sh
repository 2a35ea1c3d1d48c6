#!/usr/bin/env bash
# Set up lungsys on a fresh Debian machine: the Debian DICOM tools and a
# Python virtual environment in .venv with the project installed in it.
#
#   scripts/setup.sh          install for running the node
#   scripts/setup.sh --test   also install the test dependencies
#
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

debs=(orthanc orthanc-dicomweb dcmtk dicom3tools)
# the tests also run the job store on a private PostgreSQL server, and make DICOM TLS
# certificates with the openssl command
[ -n "$extras" ] && debs+=(postgresql openssl)
# the viewer tests (tests/test_viewer.py) run OHIF in Debian's headless chromium, and Node.js
# programs (Node.js 20 or newer); Debian's nodejs and npm only where no node or npm is on
# PATH (a NodeSource node, for one, brings its own npm and conflicts with Debian's)
if [ -n "$extras" ]; then
    debs+=(chromium)
    command -v node >/dev/null || debs+=(nodejs)
    command -v npm >/dev/null || debs+=(npm)
fi
python3 -c 'import venv, ensurepip' 2>/dev/null || debs+=(python3-venv)

missing=()
for p in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "setup: installing Debian packages: ${missing[*]}"
    $sudo apt-get update -q
    # Debian's orthanc package may start its own system-wide service; the
    # tests never use it: they start their own Orthanc on free loopback ports.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi
pip_install() {
    # pip warns about every missing local index folder; keep real errors only
    .venv/bin/python -m pip install -q "$@" 2> >(grep -v "is neither a file nor a directory" >&2)
}
pip_install --upgrade pip
# The CPU build of torch comes from the local wheel folder; pin it first so
# that no other requirement pulls a CUDA build.
pip_install "torch==2.13.0"
pip_install -e ".${extras}"

if [ -n "$extras" ]; then
    # The viewer tests' npm packages, exactly as their package-lock.json pins them (versions
    # and sha512), without install scripts; skipped where node_modules already holds that lock.
    for dir in tests/viewer/*/; do
        [ -f "$dir/package-lock.json" ] || continue
        stamp="$dir/node_modules/.lungsys-lock.sha256"
        want="$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)"
        if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
            echo "setup: npm ci in $dir"
            (cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
            echo "$want" > "$stamp"
        fi
    done
fi
echo "setup: done ($(.venv/bin/lungsys --version))"
