#!/usr/bin/env bash
# Prints the folder of an official Node build (bin/node, include/node) for Linux, unpacked
# from the npm registry's node-linux-ARCH package into .cache/node/ on first use.
#   scripts/node-dist.sh x64|arm64 oldest|lts|VERSION
# oldest: the version package.json's engines names (">=X.Y.Z"); lts: the current LTS below.
set -euo pipefail
cd "$(dirname "$0")/.."
lts=26.12.1

arch="${1:-}"
version="${2:-}"
case "$arch" in x64|arm64) ;; *) echo "node-dist.sh: arch must be x64 or arm64, not '$arch'" >&2; exit 2 ;; esac
case "$version" in
  oldest) version="$(node -p "const r = require('./package.json').engines.node; (/^>=(\d+\.\d+\.\d+)$/.exec(r) || [])[1] || ''")"
          [ -n "$version" ] || { echo "node-dist.sh: package.json engines.node is not of the form >=X.Y.Z" >&2; exit 2; } ;;
  lts) version="$lts" ;;
  [0-9]*.[0-9]*.[0-9]*) ;;
  *) echo "node-dist.sh: version must be oldest, lts or X.Y.Z, not '$version'" >&2; exit 2 ;;
esac

dir="$PWD/.cache/node/linux-$arch-$version"
if [ ! -x "$dir/bin/node" ]; then
  mkdir -p .cache/node
  tmp="$(mktemp -d "$PWD/.cache/node/.unpack-XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  tarball="$(cd "$tmp" && npm pack --silent --loglevel=error "node-linux-$arch@$version")"
  tar xzf "$tmp/$tarball" -C "$tmp" --strip-components=1
  rm "$tmp/$tarball"
  [ -x "$tmp/bin/node" ] || { echo "node-dist.sh: node-linux-$arch@$version holds no bin/node" >&2; exit 1; }
  # Another run may have unpacked it meanwhile: then its copy stands.
  mv -T "$tmp" "$dir" 2>/dev/null || [ -x "$dir/bin/node" ] || { echo "node-dist.sh: cannot move $tmp to $dir" >&2; exit 1; }
fi
echo "$dir"
