#!/usr/bin/env bash
# Builds the native libFuzzer targets with ASan and UBSan (CMakeLists.txt,
# QCOW2IMG_FUZZ) and runs each for a bounded time. Seeds come from QEMU-made
# images, made here. A crash fails the run; its input is kept under
# build-fuzz/crashes/ to become a regression test.
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-20}"
# clang-14, its sanitizer runtimes and cmake come from scripts/setup.sh (npm run setup).
if ! command -v clang++-14 >/dev/null || ! command -v cmake >/dev/null || [ ! -d /usr/lib/llvm-14/lib/clang/14.0.6/lib/linux ]; then
  echo "fuzz: needs clang-14, libclang-rt-14-dev and cmake: run npm run setup (as root)" >&2
  exit 1
fi
build=build-fuzz
cmake -S . -B "$build" -DQCOW2IMG_FUZZ=ON -DCMAKE_CXX_COMPILER=clang++-14 -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" -j "$(nproc)" >/dev/null

# Seeds: L2 tables and compressed clusters from images QEMU made.
seeds="$build/seeds"
rm -rf "$seeds" && mkdir -p "$seeds"/{l2,decompress,copy}
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
head -c 4M /usr/bin/bash > "$work/disk.raw"
truncate -s 8M "$work/disk.raw"
qemu-img convert -q -f raw -O qcow2 -c "$work/disk.raw" "$work/zlib.qcow2"
qemu-img convert -q -f raw -O qcow2 -c -o compression_type=zstd "$work/disk.raw" "$work/zstd.qcow2"
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128k "$work/ext.qcow2" 8M
qemu-io -c 'write -P 1 0 100k' -c 'write -z 200k 64k' "$work/ext.qcow2" >/dev/null
python3 - "$work" "$seeds" <<'PY'
import struct, sys, os
work, seeds = sys.argv[1], sys.argv[2]
for name, bits_override in (("zlib", 0), ("zstd", 1), ("ext", 2)):
    data = open(os.path.join(work, name + ".qcow2"), "rb").read()
    cluster_bits = struct.unpack(">I", data[20:24])[0]
    l1 = struct.unpack(">Q", data[40:48])[0]
    l2 = struct.unpack(">Q", data[l1:l1 + 8])[0] & 0x00fffffffffffe00
    cs = 1 << cluster_bits
    table = data[l2:l2 + cs]
    ext = 1 if name == "ext" else 0
    open(os.path.join(seeds, "l2", name), "wb").write(bytes([cluster_bits - 9, ext, 0, 255]) + table)
    # First compressed cluster's stream, as the decompress target takes it.
    entry = struct.unpack(">Q", table[0:8])[0]
    if entry >> 62 & 1:
        x = 62 - (cluster_bits - 8)
        off = entry & ((1 << x) - 1)
        n = ((entry >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
        stream = data[off:off + n * 512]
        open(os.path.join(seeds, "decompress", name), "wb").write(bytes([bits_override, cluster_bits - 9]) + stream)
        open(os.path.join(seeds, "copy", name), "wb").write(bytes(16) + stream)
PY

status=0
for target in fuzz_l2_walk fuzz_decompress fuzz_copy_engine; do
  corpus="$build/corpus/$target"
  mkdir -p "$corpus" "$build/crashes"
  seed_dir="$seeds/${target#fuzz_}"
  [ "$target" = fuzz_l2_walk ] && seed_dir="$seeds/l2"
  [ "$target" = fuzz_copy_engine ] && seed_dir="$seeds/copy"
  if ! "$build/$target" "$corpus" "$seed_dir" -max_total_time="$seconds" -rss_limit_mb=2048 \
       -artifact_prefix="$build/crashes/$target-" -print_final_stats=0 >"$build/$target.log" 2>&1; then
    echo "fuzz: $target found a failure; see $build/$target.log and $build/crashes/" >&2
    tail -30 "$build/$target.log" >&2
    status=1
  else
    echo "fuzz: $target ran ${seconds}s clean ($(grep -c . "$build/$target.log" || true) log lines)"
  fi
done
exit $status
