#!/usr/bin/env bash
# Makes examples/demo.qcow2: a 64 MiB disk with real file contents, empty ranges
# and zstd-compressed clusters, made by qemu-img so that it is what users load.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/demo.qcow2"
[ -f "$out" ] && exit 0
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
truncate -s 64M "$work/demo.raw"
offset=0
for f in /usr/share/common-licenses/* /etc/services /etc/protocols; do
  [ -f "$f" ] || continue
  dd if="$f" of="$work/demo.raw" bs=4096 seek=$((offset / 4096)) conv=notrunc status=none
  offset=$((offset + 3 * 1024 * 1024))
  [ "$offset" -lt $((60 * 1024 * 1024)) ] || break
done
qemu-img convert -q -f raw -O qcow2 -c -o compression_type=zstd "$work/demo.raw" "$work/demo.qcow2"
mv "$work/demo.qcow2" "$out"
echo "made $out" >&2
