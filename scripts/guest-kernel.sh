#!/usr/bin/env bash
# The kernel of the tiny QEMU guest that test/snapshot/qemu-resume.test.ts and
# examples/qemu-snapshot.sh boot: Debian's cloud kernel (small, boots in seconds under
# TCG), unpacked from its package without installing it, with the six virtio modules its
# virtio disk needs. Into .cache/guest-kernel/: vmlinuz and modules/*.ko.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.cache/guest-kernel
[ -f "$out/vmlinuz" ] && [ -f "$out/modules/virtio_blk.ko" ] && exit 0
package="$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ { print $2; exit }')"
[ -n "$package" ] || { echo "guest-kernel: no linux-image-cloud-amd64 in the apt lists (apt-get update?)" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# apt-get download writes into the current folder; _apt cannot write a mktemp folder.
chmod 755 "$work"
(cd "$work" && apt-get download -qq "$package" 2>/dev/null)
dpkg-deb -x "$work"/*.deb "$work/root"
rm -rf "$out" && mkdir -p "$out/modules"
cp "$work"/root/boot/vmlinuz-* "$out/vmlinuz"
for module in drivers/virtio/virtio drivers/virtio/virtio_ring drivers/virtio/virtio_pci_legacy_dev \
              drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci drivers/block/virtio_blk; do
  cp "$work"/root/lib/modules/*/kernel/"$module".ko "$out/modules/"
done
echo "guest-kernel: $package in $out" >&2
