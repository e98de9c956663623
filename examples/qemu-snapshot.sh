#!/usr/bin/env bash
# Snapshot a running QEMU guest with qcow2img and resume it from the snapshot.
#
#   boot -> pause -> save device state -> snapshot (disk + RAM + device state)
#   -> destroy everything -> restore -> resume the guest where it stopped
#
# The guest keeps its RAM in a shared file (memory-backend-file, share=on), so QEMU's
# migration stream (with x-ignore-shared) carries only device and CPU state; qcow2img
# stores that RAM file, the disk and the stream, and restore gives QEMU back all three.
#
# A tiny guest is built here: Debian's cloud kernel (scripts/guest-kernel.sh, run by
# `npm run setup`) and a busybox initramfs whose init counts in RAM and prints, every
# 0.3 s, the count and a hash of two files it rereads from its ext4 disk. Resumed, the
# count goes on from where it was; rebooted, it would start again at 1.
#
# Usage: examples/qemu-snapshot.sh WORKDIR [folder|tar.zst] [RAM_SIZE] [MEMORY_MAP]   (as root: the disk is a loop device)
#   RAM_SIZE: the guest's RAM (default 256M); MEMORY_MAP: snapshot create's --memory-map, e.g. q35:3G
# Leaves in WORKDIR: serial-before.log, serial-after.log, bundle or bundle.tar.zst.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mkdir -p "$1" && cd "$1" && pwd)"
format="${2:-folder}"
qcow2img=(node "$here/dist/cli/main.js")
kernel_dir="${QCOW2IMG_GUEST_KERNEL:-$here/.cache/guest-kernel}"
ram_size="${3:-256M}"
memory_map=(); [ -n "${4:-}" ] && memory_map=(--memory-map "$4")

# --- the guest: kernel, initramfs, an ext4 disk on a loop device -------------------------
build_initramfs() {
  local root="$work/initramfs"
  rm -rf "$root" && mkdir -p "$root"/{bin,lib,proc,sys,dev,mnt}
  cp /bin/busybox "$root/bin/busybox"
  cp "$kernel_dir"/modules/*.ko "$root/lib/"
  cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
# virtio_ring before virtio, the PCI transports before virtio_pci: their symbol order.
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do insmod /lib/$m.ko; done
mount -t ext4 /dev/vda /mnt
echo booted
n=0
while true; do
  n=$((n+1))
  # Reread from the disk, not the page cache (which is RAM, and restored with it).
  echo 3 > /proc/sys/vm/drop_caches
  echo "count $n $(cat /mnt/a /mnt/b | sha256sum | cut -c1-16)"
  sleep 0.3
done
INIT
  chmod +x "$root/init"
  (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/initramfs.gz"
}

make_disk() {
  mkdir -p "$work/files"
  head -c 3M /dev/urandom > "$work/files/a"
  head -c 1M /dev/urandom > "$work/files/b"
  rm -f "$work/disk.raw" && truncate -s 64M "$work/disk.raw"
  mkfs.ext4 -q -F -d "$work/files" "$work/disk.raw"
  disk="$(losetup -f --show "$work/disk.raw")"
  echo "$disk" > "$work/loop-device"
}

# --- QEMU, driven over QMP -------------------------------------------------------------------
qemu() {  # qemu SERIAL_LOG [extra args...]
  local log="$1"; shift
  rm -f "$work/qmp.sock"
  qemu-system-x86_64 -accel tcg -machine q35,memory-backend=mem -m "$ram_size" \
    -object "memory-backend-file,id=mem,size=$ram_size,mem-path=$work/ram.bin,share=on" \
    -kernel "$kernel_dir/vmlinuz" -initrd "$work/initramfs.gz" -append "console=ttyS0 quiet panic=-1" \
    -display none -nodefaults -no-user-config -no-reboot -serial "file:$log" \
    -drive "file=$disk,format=raw,if=virtio,cache=none" \
    -qmp "unix:$work/qmp.sock,server=on,wait=off" "$@" &
  qemu_pid=$!
  for _ in $(seq 100); do [ -S "$work/qmp.sock" ] && return; sleep 0.1; done
  echo "qemu-snapshot: QEMU did not open its QMP socket" >&2; exit 1
}

# qmp COMMAND [JSON_ARGUMENTS]: one command on a fresh QMP session; prints its "return".
qmp() {
  python3 - "$work/qmp.sock" "$@" <<'PY'
import json, socket, sys
sock = socket.socket(socket.AF_UNIX); sock.connect(sys.argv[1]); stream = sock.makefile('rw')
def call(name, arguments=None):
    stream.write(json.dumps({'execute': name, **({'arguments': arguments} if arguments else {})}) + '\n'); stream.flush()
    while True:
        reply = json.loads(stream.readline())
        if 'return' in reply: return reply['return']
        if 'error' in reply: sys.exit(f"qmp {name}: {reply['error']['desc']}")
json.loads(stream.readline())  # the greeting
call('qmp_capabilities')
print(json.dumps(call(sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else None)))
PY
}

wait_for() {  # wait_for FILE PATTERN
  for _ in $(seq 600); do grep -q "$2" "$1" 2>/dev/null && return; sleep 0.1; done
  echo "qemu-snapshot: no '$2' in $1" >&2; exit 1
}

wait_migration() {  # until query-migrate says completed
  for _ in $(seq 300); do
    status="$(qmp query-migrate | python3 -c 'import json,sys; print(json.load(sys.stdin).get("status",""))')"
    [ "$status" = completed ] && return
    [ "$status" = failed ] && { echo "qemu-snapshot: migration failed" >&2; exit 1; }
    sleep 0.1
  done
  echo "qemu-snapshot: migration did not complete" >&2; exit 1
}

stop_qemu() {
  qmp quit >/dev/null || true
  wait "$qemu_pid" || true
}

cleanup() {
  [ -n "${qemu_pid:-}" ] && kill "$qemu_pid" 2>/dev/null || true
  [ -n "${disk:-}" ] && losetup -d "$disk" 2>/dev/null || true
}
trap cleanup EXIT

# --- the loop ----------------------------------------------------------------------------------
build_initramfs
make_disk
truncate -s "$ram_size" "$work/ram.bin"

echo "qemu-snapshot: booting the guest" >&2
qemu "$work/serial-before.log"
wait_for "$work/serial-before.log" "count 3 "

echo "qemu-snapshot: pausing and saving its device state" >&2
qmp stop >/dev/null
qmp migrate-set-capabilities '{"capabilities":[{"capability":"x-ignore-shared","state":true}]}' >/dev/null
qmp migrate "{\"uri\":\"exec:cat > $work/state.bin\"}" >/dev/null
wait_migration

# The migration over, QEMU has let go of the disk (its images are inactive, its locks gone):
# the paused VM may stay while qcow2img reads it. A running VM's disk would be refused.
bundle="$work/bundle"; [ "$format" = folder ] || bundle="$work/bundle.$format"
echo "qemu-snapshot: snapshot into $bundle" >&2
"${qcow2img[@]}" snapshot create "$bundle" --disk "$disk" --memory "$work/ram.bin" "${memory_map[@]}" --device "qemu-migration=$work/state.bin" >/dev/null
stop_qemu

echo "qemu-snapshot: destroying the disk, the RAM and the state" >&2
dd if=/dev/zero of="$disk" bs=1M count=$(( $(blockdev --getsize64 "$disk") / 1048576 )) oflag=direct status=none
rm -f "$work/ram.bin" "$work/state.bin"

echo "qemu-snapshot: restoring" >&2
rm -rf "$work/devices"
"${qcow2img[@]}" snapshot restore "$bundle" --disk "$disk" --memory "$work/ram.bin" --device-dir "$work/devices" >/dev/null

echo "qemu-snapshot: resuming" >&2
qemu "$work/serial-after.log" -incoming defer
qmp migrate-set-capabilities '{"capabilities":[{"capability":"x-ignore-shared","state":true}]}' >/dev/null
qmp migrate-incoming "{\"uri\":\"exec:cat $work/devices/qemu-migration\"}" >/dev/null
wait_migration
qmp cont >/dev/null
last="$(grep -o 'count [0-9]*' "$work/serial-before.log" | tail -1 | cut -d' ' -f2)"
wait_for "$work/serial-after.log" "count $((last + 2)) "
stop_qemu
echo "qemu-snapshot: the guest went on from count $last" >&2
