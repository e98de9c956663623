#!/usr/bin/env bash
# One-step setup on Debian/Ubuntu: system packages (as root), npm dependencies and
# the native addon, the TypeScript build, and the demo image examples/demo.qcow2.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(libdeflate-dev libzstd-dev libxxhash-dev libisal-dev liburing-dev qemu-utils qemu-system-x86 busybox-static cpio fdisk fio zstd g++ make python3 nginx openssl qemu-block-extra)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "qcow2img setup: missing ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "qcow2img setup: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

npm ci --no-audit --no-fund --loglevel=error
npm run --silent compile
bash examples/make-demo.sh
# The tiny guest kernel the QEMU snapshot test and examples/qemu-snapshot.sh boot.
bash scripts/guest-kernel.sh
