#!/usr/bin/env bash
# One-step setup on Debian 12 (as root): every system package that the build, the tests, the
# benchmarks and scripts/ call, then the npm dependencies and the native addon, the TypeScript
# build, and the demo image examples/demo.qcow2. Nothing else in the repository installs
# packages, so a fresh machine that ran this has all they need (.ci/run proves it in a fresh
# Debian root). Quick when everything is there: one dpkg-query, no apt.
set -euo pipefail
cd "$(dirname "$0")/.."

# package | commands it must provide (checked after the install) | who needs it
# Essential packages (coreutils, tar, gzip, diffutils, findutils, libc-bin) are on every Debian.
readonly REQUIREMENTS='
g++               | g++                    | the native addon (node-gyp)
make              | make                   | node-gyp; the fuzz build (cmake)
python3           | python3                | node-gyp; test/vmstate/format-docs; scripts/fuzz.sh seeds
libdeflate-dev    |                        | the addon links libdeflate.a
libzstd-dev       |                        | the addon links libzstd.a
libxxhash-dev     |                        | the addon (XXH3); test/vmstate/format-docs loads libxxhash.so.0
libisal-dev       |                        | the addon (ISA-L deflate)
liburing-dev      |                        | the addon links liburing.a
zlib1g-dev        |                        | the addon links libz.a
qemu-utils        | qemu-img qemu-io       | tests, examples/make-demo.sh, fuzz seeds, benchmarks
zstd              | zstd                   | tests (vmstate/format-docs, snapshot/hostile-archives), benchmarks
fdisk             | sfdisk                 | tests (partitioned loop devices), benchmarks
mount             | losetup mount umount   | tests and benchmarks on loop devices
util-linux        | partx blkid blockdev fallocate prlimit findmnt setpriv | tests, benchmarks
util-linux-extra  | fincore                | benchmarks/snapshot.mjs (page cache residency)
e2fsprogs         | mkfs.ext4              | tests (mounted devices), benchmarks
gcc               | cc                     | tests compile small C helpers (an LD_PRELOAD shim, printf checks)
libc6-dev         |                        | cc links those helpers (gcc only recommends it)
fio               | fio                    | benchmarks: the anchor for bench and load
time              | /usr/bin/time          | benchmarks: CPU time and peak RSS of each tool
git               | git                    | benchmarks record the commit they measured
file              | file                   | benchmarks/ram-dump.mjs tells a static busybox
cmake             | cmake                  | scripts/fuzz.sh builds the fuzz targets
clang-14          | clang++-14             | scripts/fuzz.sh: libFuzzer, ASan, UBSan
libclang-rt-14-dev|                        | scripts/fuzz.sh: the sanitizer and libFuzzer runtimes
qemu-system-x86   | qemu-system-x86_64     | tests run VMs under TCG; benchmarks/ram-dump.mjs
busybox-static    | busybox                | a tiny initramfs guest (tests, ram-dump.mjs)
cpio              | cpio                   | packs that initramfs
nginx             | nginx                  | HTTP tests (each starts its own server)
qemu-user-static  | qemu-aarch64-static    | running arm64 builds on x86-64
debootstrap       | debootstrap            | prebuilds made in an older Debian root; .ci/run
binutils          | readelf                | checks of the prebuilt addon (symbol versions)
man-db            | man                    | tests render the man page qcow2img.1
groff-base        | nroff                  | the formatter man runs
openssl           | openssl                | HTTPS tests make their CA and certificates
qemu-block-extra  |                        | benchmarks: the curl driver of qemu-img reads http(s) images
'

# The first column of REQUIREMENTS.
package_list() {
  awk -F'|' 'NF == 3 { gsub(/ /, "", $1); print $1 }' <<<"$REQUIREMENTS"
}

# Packages of the list that dpkg does not have installed, one per line.
missing_packages() {
  local -a packages
  mapfile -t packages < <(package_list)
  # dpkg-query exits 1 when it knows some name not at all; those print nothing, so compare.
  comm -23 <(printf '%s\n' "${packages[@]}" | sort) \
    <(dpkg-query -W -f='${Package} ${Status}\n' "${packages[@]}" 2>/dev/null | awk '$4 == "installed" { print $1 }' | sort)
}

install_packages() {
  local -a missing=("$@")
  if [ "$(id -u)" -ne 0 ]; then
    echo "qcow2img setup: missing ${missing[*]}; run as root or: sudo apt-get install --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
  echo "qcow2img setup: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Every command of the list runs from PATH (an install that left one out, say through a
# changed Recommends, fails here and not in the middle of a test).
check_commands() {
  local -a absent=()
  local command
  for command in $(awk -F'|' 'NF == 3 { print $2 }' <<<"$REQUIREMENTS"); do
    command -v "$command" >/dev/null || absent+=("$command")
  done
  if [ ${#absent[@]} -gt 0 ]; then
    echo "qcow2img setup: installed, but not found on PATH: ${absent[*]} (is /usr/sbin on PATH?)" >&2
    exit 1
  fi
}

# The q35 machine needs its firmware (seabios, qemu-system-data), which --no-install-recommends
# could leave out: start one, paused, and quit it.
check_qemu_system() {
  if ! echo quit | timeout 30 qemu-system-x86_64 -machine q35 -accel tcg -S -display none -nodefaults -monitor stdio >/dev/null 2>&1; then
    echo "qcow2img setup: qemu-system-x86_64 -machine q35 -accel tcg does not start:" >&2
    echo quit | timeout 30 qemu-system-x86_64 -machine q35 -accel tcg -S -display none -nodefaults -monitor stdio 2>&1 >/dev/null | tail -3 >&2
    exit 1
  fi
}

mapfile -t missing < <(missing_packages)
if [ ${#missing[@]} -gt 0 ]; then
  install_packages "${missing[@]}"
  check_qemu_system
fi
check_commands

npm ci --no-audit --no-fund --loglevel=error
npm run --silent compile
bash examples/make-demo.sh
# The prebuilt addons the package tests install (a Debian 11 root, cached under .cache/roots).
bash scripts/prebuild.sh
# The tiny guest's kernel the QEMU snapshot test and examples/qemu-snapshot.sh boot.
bash scripts/guest-kernel.sh
