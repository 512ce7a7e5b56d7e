#!/usr/bin/env bash
# Regenerate requirements.lock (every package the image installs, each with its sha256 hashes) from the pins in
# requirements.txt. Run it after changing requirements.txt; tests/test_container.py fails while the two disagree.
#
#   scripts/lock-requirements.sh
#
# It needs PyPI (or a mirror of it: UV_DEFAULT_INDEX=...) and uv; without uv on PATH it installs the pinned uv into a
# throwaway venv. Behind a TLS-intercepting proxy set SSL_CERT_FILE to its CA bundle. The lock is resolved for the
# image's platform (CPython 3.11, manylinux_2_28 x86_64), whatever machine runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.8

uv=$(command -v uv || true)
if [ -z "$uv" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m venv "$tmp/venv"
    "$tmp/venv/bin/pip" install -q "uv==$UV_VERSION"
    uv="$tmp/venv/bin/uv"
fi

in=$(mktemp)
out=$(mktemp)
trap 'rm -f "$in" "$out"; [ -n "${tmp:-}" ] && rm -rf "$tmp"' EXIT
grep -v -E '^\s*-e\s' requirements.txt > "$in"     # the project itself is installed separately (--no-deps)
"$uv" pip compile "$in" --generate-hashes --no-header --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 -o "$out" --quiet

{
    echo "# requirements.lock: every package of the image, pinned, with the sha256 of each file PyPI has for it."
    echo "# Generated from requirements.txt (without '-e .') by scripts/lock-requirements.sh, i.e."
    echo "#   grep -v '^-e ' requirements.txt > in.txt"
    echo "#   uv pip compile in.txt --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28"
    echo "# with uv $UV_VERSION against PyPI. Install: pip install --require-hashes -r requirements.lock"
    echo "# torch==2.14.1 here is PyPI's Linux x86_64 wheel, the CUDA 13.0 build (its CUDA libraries are the nvidia-*"
    echo "# packages below); it also runs on CPU. Do not edit by hand: tests/test_container.py checks it against"
    echo "# requirements.txt."
    sed -e "s#$in#requirements.txt#g" "$out"
} > requirements.lock
echo "wrote requirements.lock ($(grep -c '^[a-z0-9]' requirements.lock) packages)"
