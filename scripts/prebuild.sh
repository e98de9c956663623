#!/usr/bin/env bash
# Builds the prebuilt addons prebuilds/linux-x64/ and prebuilds/linux-arm64/ (qcow2img.glibc.node)
# inside a Debian 11 (bullseye) root, so they ask for no glibc newer than bullseye's 2.31 and
# nothing of the C++ runtime (libstdc++ and libgcc static). arm64 is cross-compiled there with
# Debian's g++-aarch64-linux-gnu. The codecs (zlib, libdeflate, libzstd, liburing, xxhash, ISA-L)
# are built from Debian 12's source packages, the versions a source build on Debian 12 links,
# and linked statically. The addon itself is built by node-gyp from binding.gyp, as `npm install`
# builds it. See docs/building.md.
#
#   scripts/prebuild.sh [--force]   (as root: debootstrap and chroot; `npm run prebuild`)
#     --force: build the addons again even when they are current.
#     DEBIAN_MIRROR: where bullseye comes from (default deb.debian.org; archive.debian.org once it moves
#     there); DEBIAN_SOURCES_MIRROR: where bookworm's sources come from (default deb.debian.org).
#
# Idempotent: the root, the codecs and the addons are cached under .cache/roots/ and rebuilt only
# when what they are made from changed; a run with nothing to do takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
fail() { echo "prebuild.sh: $*" >&2; exit 1; }
force=0
case "${1:-}" in --force) force=1 ;; "") ;; *) fail "unknown argument '$1' (usage: scripts/prebuild.sh [--force])" ;; esac
[ "$(id -u)" -eq 0 ] || fail "needs root (debootstrap and chroot); run: sudo npm run prebuild"
command -v debootstrap >/dev/null || fail "debootstrap is missing; apt-get install debootstrap"
[ -f node_modules/node-gyp/package.json ] && [ -f node_modules/node-addon-api/package.json ] || fail "node_modules is missing; run npm ci first"

cache="$repo/.cache/roots"
root="$cache/bullseye"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
sources_mirror="${DEBIAN_SOURCES_MIRROR:-http://deb.debian.org/debian}"
mkdir -p "$cache"
exec 9>"$cache/lock"
flock 9

# What the root holds. A change here makes a new root.
root_packages="g++ make python3 nasm dpkg-dev xz-utils bzip2 g++-aarch64-linux-gnu binutils-aarch64-linux-gnu"
source_packages="zlib libdeflate libzstd liburing xxhash libisal"
root_recipe="bullseye minbase; $root_packages; sources from bookworm: $source_packages"

in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C DEBIAN_FRONTEND=noninteractive "$@"; }
sha() { sha256sum "$@" | sha256sum | cut -c1-64; }
# debootstrap mounts /proc, /sys and (in a container) /dev inside the root it makes; a run that
# died there may have left them. Never delete through a mount.
unmount_under() {
  local dir="$1" target
  for target in $(awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r); do umount -l "$target" || true; done
  ! awk -v d="$dir/" 'index($2, d) == 1 { found = 1 } END { exit !found }' /proc/self/mounts ||
    fail "$dir still has file systems mounted inside; unmount them first"
}
started=$SECONDS
step() { echo "prebuild.sh: $* ($((SECONDS - started)) s)" >&2; }

# ---- the root: Debian 11, its compilers, and Debian 12's codec sources unpacked in /opt/src ----
if [ "$(cat "$root/.qcow2img-root" 2>/dev/null)" != "$root_recipe" ]; then
  step "debootstrap bullseye into $root"
  unmount_under "$root" && unmount_under "$root.new"
  rm -rf "$root" "$root.new"
  debootstrap --variant=minbase bullseye "$root.new" "$mirror" >"$cache/debootstrap.log" 2>&1 ||
    fail "debootstrap bullseye failed (log: $cache/debootstrap.log)"
  echo "deb-src $sources_mirror bookworm bookworm-updates main" >"$root.new/etc/apt/sources.list.d/bookworm-src.list"
  # A root made to build in and thrown away: dpkg need not fsync every file it unpacks.
  echo force-unsafe-io >"$root.new/etc/dpkg/dpkg.cfg.d/qcow2img-unsafe-io"
  mv "$root.new" "$root"
  step "installing $root_packages"
  { in_root apt-get update -qq && in_root apt-get install -y -qq --no-install-recommends $root_packages; } \
    >"$cache/apt.log" 2>&1 || fail "apt-get in the root failed (log: $cache/apt.log)"
  step "fetching the sources of $source_packages (bookworm)"
  rm -rf "$root/opt/src" && mkdir -p "$root/opt/src"
  in_root sh -c "cd /opt/src && apt-get source -qq $source_packages" >"$cache/source.log" 2>&1 ||
    fail "apt-get source in the root failed (log: $cache/source.log)"
  in_root apt-get clean
  echo "$root_recipe" >"$root/.qcow2img-root"
fi
src() { find "$root/opt/src" -mindepth 1 -maxdepth 1 -type d -name "$1-[0-9]*" -printf '/opt/src/%f\n'; }

# ---- the codecs, static and position-independent, per architecture, into /opt/codecs/ARCH ----
build_codecs() {
  local arch="$1" cc="$2"
  local recipe
  recipe="$(declare -f build_codecs | sha256sum | cut -c1-16) $(ls "$root/opt/src" | tr '\n' ' ')"
  [ "$(cat "$root/opt/codecs/$arch/.recipe" 2>/dev/null)" = "$recipe" ] && return 0
  step "building the codecs for $arch"
  rm -rf "$root/opt/codecs/$arch" "$root/opt/build/$arch"
  mkdir -p "$root/opt/codecs/$arch/lib" "$root/opt/codecs/$arch/include/isa-l" "$root/opt/build/$arch"
  local isal_args="units=igzip CFLAGS_=-fPIC"
  [ "$arch" = arm64 ] && isal_args="units=igzip host_cpu=aarch64 arch=aarch64 CFLAGS_aarch64=-fPIC"
  in_root sh -euc "
    b=/opt/build/$arch; out=/opt/codecs/$arch
    for d in $(src zlib) $(src libdeflate) $(src libzstd) $(src liburing) $(src libisal); do cp -a \$d \$b/; done
    cd \$b/zlib-*/ && CC=$cc CFLAGS='-O3 -fPIC' ./configure --static >/dev/null && make -s -j2 libz.a >/dev/null
    cp libz.a \$out/lib/ && cp zlib.h zconf.h \$out/include/
    cd \$b/libdeflate-*/ && make -s -j2 CC=$cc CFLAGS='-O2 -fPIC' libdeflate.a >/dev/null
    cp libdeflate.a \$out/lib/ && cp libdeflate.h \$out/include/
    cd \$b/libzstd-*/lib && make -s -j2 CC=$cc CFLAGS='-O3 -fPIC' ZSTD_LEGACY_SUPPORT=0 ZSTD_LIB_DICTBUILDER=0 libzstd.a-mt >/dev/null
    cp libzstd.a \$out/lib/ && cp zstd.h zstd_errors.h zdict.h \$out/include/
    cd \$b/liburing-*/ && ./configure --cc=$cc --cxx=${cc%gcc}g++ >/dev/null && make -s -j2 -C src CFLAGS='-O3 -fPIC -fno-stack-protector' liburing.a >/dev/null
    cp src/liburing.a \$out/lib/ && cp -r src/include/. \$out/include/
    cd \$b/libisal-*/ && make -s -j2 -f Makefile.unx CC=$cc $isal_args lib >/dev/null
    cp bin/isa-l.a \$out/lib/libisal.a && cp include/*.h \$out/include/isa-l/
    cp $(src xxhash)/xxhash.h $(src xxhash)/xxh3.h \$out/include/
  " >"$cache/codecs-$arch.log" 2>&1 || fail "building the codecs for $arch failed (log: $cache/codecs-$arch.log)"
  # The compiler must be the one that made them: check one object's architecture.
  file_arch="$(in_root sh -c "cd /tmp && ar x /opt/codecs/$arch/lib/libz.a deflate.o && ${cc%gcc}readelf -h deflate.o | sed -n 's/ *Machine: *//p'; rm -f deflate.o")"
  case "$arch:$file_arch" in x64:*X86-64*|arm64:*AArch64*) ;; *) fail "the $arch codecs came out for '$file_arch'" ;; esac
  rm -rf "$root/opt/build/$arch"
  echo "$recipe" >"$root/opt/codecs/$arch/.recipe"
}
build_codecs x64 gcc
build_codecs arm64 aarch64-linux-gnu-gcc

# ---- Node for node-gyp: the current LTS runs it; the headers are the oldest Node's (engines) ----
node_lts="$(bash scripts/node-dist.sh x64 lts)"
node_oldest="$(bash scripts/node-dist.sh x64 oldest)"
gyp_version="$(node -p "require('./node_modules/node-gyp/package.json').version")"
api_version="$(node -p "require('./node_modules/node-addon-api/package.json').version")"
tools_recipe="node $(basename "$node_lts") headers $(basename "$node_oldest") node-gyp $gyp_version node-addon-api $api_version"
if [ "$(cat "$root/opt/tools/.recipe" 2>/dev/null)" != "$tools_recipe" ]; then
  step "installing node-gyp $gyp_version and node-addon-api $api_version into the root"
  rm -rf "$root/opt/tools" && mkdir -p "$root/opt/tools"
  cp -a "$node_lts" "$root/opt/tools/node"
  cp -a "$node_oldest/include" "$root/opt/tools/headers-include" && mkdir -p "$root/opt/tools/headers" &&
    mv "$root/opt/tools/headers-include" "$root/opt/tools/headers/include"
  echo '{"private":true}' >"$root/opt/tools/package.json"
  npm install --prefix "$root/opt/tools" --no-save --no-package-lock --ignore-scripts --no-audit --no-fund --loglevel=error \
    "node-gyp@$gyp_version" "node-addon-api@$api_version" >/dev/null || fail "npm install of node-gyp into the root failed"
  echo "$tools_recipe" >"$root/opt/tools/.recipe"
fi

# ---- the addons ----
inputs="$(sha scripts/prebuild.sh binding.gyp native/binding.cc native/sources.txt native/core/* | cut -c1-32) $tools_recipe $(cat "$root/opt/codecs/"*/.recipe | sha256sum | cut -c1-16)"
outputs=(prebuilds/linux-x64/qcow2img.glibc.node prebuilds/linux-arm64/qcow2img.glibc.node)
stamp="$cache/prebuilds.stamp"
if [ "$force" -eq 0 ] && [ -f "${outputs[0]}" ] && [ -f "${outputs[1]}" ] &&
   [ "$(cat "$stamp" 2>/dev/null)" = "$inputs $(sha "${outputs[@]}")" ]; then
  echo "prebuild.sh: prebuilds/ is up to date" >&2
  exit 0
fi

build_addon() {
  local arch="$1" cross="$2"
  step "building the addon for $arch"
  rm -rf "$root/opt/qcow2img" && mkdir -p "$root/opt/qcow2img"
  cp -a binding.gyp native "$root/opt/qcow2img/"
  ln -s /opt/tools/node_modules "$root/opt/qcow2img/node_modules"
  in_root PATH=/opt/tools/node/bin:/usr/bin:/bin HOME=/tmp \
    CC="${cross}gcc" CXX="${cross}g++" CXXFLAGS="-I/opt/codecs/$arch/include" LDFLAGS="-L/opt/codecs/$arch/lib" \
    sh -c "cd /opt/qcow2img && node /opt/tools/node_modules/node-gyp/bin/node-gyp.js rebuild --arch=$arch --nodedir=/opt/tools/headers -j 2" \
    >"$cache/addon-$arch.log" 2>&1 || fail "building the addon for $arch failed (log: $cache/addon-$arch.log)"
  in_root "${cross}strip" --strip-unneeded /opt/qcow2img/build/Release/qcow2img.node
  mkdir -p "prebuilds/linux-$arch"
  cp "$root/opt/qcow2img/build/Release/qcow2img.node" "prebuilds/linux-$arch/qcow2img.glibc.node"
  rm -rf "$root/opt/qcow2img"
}
rm -rf prebuilds
build_addon x64 ""
build_addon arm64 aarch64-linux-gnu-
echo "$inputs $(sha "${outputs[@]}")" >"$stamp"
step "done: ${outputs[*]}"
