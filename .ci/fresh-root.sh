#!/usr/bin/env bash
# The body of .ci/run, inside its private mount and PID namespaces: makes a minimal Debian 12
# root, gives it only what a user's machine has before our README (Node.js with npm, their
# config and CA bundle, DNS, apt sources), a clean clone of HEAD, and runs there the README's
# commands exactly as the README writes them, then the fuzzers. The mounts made here exist only
# in this namespace and every process started here dies with it, so nothing outlives the run.
# Usage: .ci/fresh-root.sh WORK REPO (WORK: an empty folder, REPO: the checkout to test).
set -euo pipefail
readonly work=$1 repo=$2
readonly root=$work/root times=$work/times
readonly SUITE=bookworm MIRROR=http://deb.debian.org/debian
readonly CHECKOUT=/root/qcow2img FUZZ_SECONDS=20

# Runs "$@" as the phase NAME and records its seconds in $times for .ci/run's summary.
phase() {
  local name=$1 start=$SECONDS
  shift
  echo "ci: $name" >&2
  "$@"
  printf '%s\t%s\n' "$((SECONDS - start))" "$name" >>"$times"
}

make_root() {
  if ! debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1; then
    tail -20 "$work/debootstrap.log" >&2
    return 1
  fi
}

# The root is bound onto itself so that inside it /proc/self/mountinfo has a "/" entry naming the
# real device (the load safety checks look for the device holding /); the host's /dev so loop
# devices and their partitions appear inside; a fresh /proc for this PID namespace.
mount_root() {
  mount --bind "$root" "$root"
  mount --rbind /dev "$root/dev"
  mount -t proc proc "$root/proc"
  mount --rbind /sys "$root/sys"
  mount -t tmpfs -o mode=0755 tmpfs "$root/run"
}

# Copies the host files given (absolute paths; those absent are skipped) to the same paths in the root.
copy_from_host() {
  local file
  for file in "$@"; do
    [ -e "$file" ] || continue
    mkdir -p "$root$(dirname "$file")"
    cp -a "$file" "$root$file"
  done
}

# The host's apt sources and settings (its mirror may need them, e.g. Check-Valid-Until), and
# the keyrings they name that the root lacks. Services are kept from starting on package
# installs as on the host (its policy-rc.d), so setup's nginx does not start a server here.
give_apt() {
  rm -f "$root/etc/apt/sources.list"
  copy_from_host /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
    /etc/apt/apt.conf.d/* /usr/sbin/policy-rc.d
  local source keyring
  for source in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -e "$source" ] || continue
    while IFS= read -r keyring; do
      [ -e "$root$keyring" ] || copy_from_host "$keyring"
    done < <(sed -nE 's/.*(Signed-By: *|signed-by=)(\/[^] ]+).*/\2/p' "$source")
  done
}

# Node.js with npm as the host has them: the files of its nodejs package, except npm's folder,
# which is copied whole (the host upgraded npm in place, so the package's list no longer
# matches it); the npm config, the CA bundle it and NODE_EXTRA_CA_CERTS name, and the host's
# local CAs, so a ca-certificates that setup may pull in rebuilds a bundle that still has them.
give_node() {
  local npm=/usr/lib/node_modules/npm
  if ! dpkg-query -W nodejs >/dev/null 2>&1; then
    echo "ci: the host's Node.js is not the Debian package nodejs, whose files the root gets" >&2
    return 1
  fi
  dpkg -L nodejs | grep -vE "^/\.?$|^$npm(/|$)" | while IFS= read -r file; do
    if [ -e "$file" ] || [ -L "$file" ]; then echo "${file#/}"; fi
  done | tar -C / --no-recursion -cf - -T - | tar -C "$root" -xf -
  tar -C / -cf - "${npm#/}" usr/bin/npm usr/bin/npx | tar -C "$root" -xf -
  copy_from_host /usr/etc/npmrc /etc/npmrc /root/.npmrc /etc/ssl/certs/ca-certificates.crt \
    /usr/local/share/ca-certificates/* "${NODE_EXTRA_CA_CERTS:-}"
}

# HEAD of the checkout as committed (nothing of its node_modules, build or dist).
give_checkout() {
  git clone -q --no-hardlinks "$repo" "$root$CHECKOUT"
  git -C "$root$CHECKOUT" checkout -q --detach "$(git -C "$repo" rev-parse HEAD)"
}

provision() {
  mount_root
  copy_from_host /etc/resolv.conf
  give_apt
  give_node
  give_checkout
  in_root 'node --version && npm --version' >&2
}

# A root login's environment, plus what this machine passes to its processes (CI, its CA bundle
# for node, proxies). No stdin, as in CI.
in_root() {
  local -a environment=(HOME=/root USER=root LOGNAME=root SHELL=/bin/bash LANG=C.UTF-8
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)
  local name
  for name in CI TERM NODE_EXTRA_CA_CERTS http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
    if [ -n "${!name:-}" ]; then environment+=("$name=${!name}"); fi
  done
  chroot "$root" /usr/bin/env -i -C "$CHECKOUT" "${environment[@]}" /bin/bash -c "$1" </dev/null
}

# The lines of README.md's first ```sh block: the commands a user runs.
readme_commands() {
  awk '/^```sh$/ { inside = 1; next } inside && /^```/ { exit } inside && NF' "$root$CHECKOUT/README.md"
}

main() {
  phase "debootstrap (minbase $SUITE)" make_root
  phase "provision (mounts, apt sources, Node.js, checkout)" provision
  local -a commands
  mapfile -t commands < <(readme_commands)
  if [ ${#commands[@]} -eq 0 ]; then
    echo "ci: README.md has no \`\`\`sh block of commands" >&2
    return 1
  fi
  local command
  for command in "${commands[@]}"; do
    phase "README: $command" in_root "$command"
  done
  phase "fuzz: bash scripts/fuzz.sh $FUZZ_SECONDS" in_root "bash scripts/fuzz.sh $FUZZ_SECONDS"
}

main
