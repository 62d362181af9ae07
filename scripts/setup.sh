#!/usr/bin/env bash
# Idempotent set-up of everything relay needs on Debian 12, as root:
# Debian packages, kernel headers for bcc (or the documented fallback), bpffs,
# a virtual environment that sees Debian's bcc, and the package with its C build.
# Safe to run again: each step checks before it acts.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"

step() { printf '\033[1m==> %s\033[0m\n' "$*"; }
warn() { printf '\033[1;33m!!! %s\033[0m\n' "$*" >&2; }
die() { printf '\033[1;31merror: %s\033[0m\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (relay creates TAP devices, namespaces and eBPF programs)"
command -v apt-get >/dev/null || die "apt-get not found: relay's set-up targets Debian 12"

# Runtime: bcc, netlink tools, nftables, the stock clients and peers used by the demo,
# the tests and the benchmarks. Build: compiler and headers for the cffi module.
PACKAGES=(
  python3 python3-venv python3-dev python3-bpfcc bpfcc-tools libffi-dev libssl-dev gcc make
  iproute2 nftables procps psmisc ca-certificates openssl kmod
  openconnect vpnc-scripts curl nginx-light
  ocserv openvpn tshark tcpdump rsyslog rsyslog-gnutls iperf3 wrk zstd
  clang llvm libclang-rt-14-dev systemd util-linux libssl-dev
)

step "Debian packages"
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "all ${#PACKAGES[@]} present"
fi

step "kernel headers for bcc"
KVER=$(uname -r)
KDIR="/lib/modules/$KVER"
if [ -e "$KDIR/build/include/generated/autoconf.h" ] || [ -e "$KDIR/build/Makefile" ]; then
  echo "found $KDIR/build"
elif apt-get install -y -q --no-install-recommends "linux-headers-$KVER" >/dev/null 2>&1; then
  echo "installed linux-headers-$KVER"
else
  ARCH=$(dpkg --print-architecture)
  dpkg-query -W -f='${Status}' "linux-headers-$ARCH" 2>/dev/null | grep -q 'install ok installed' \
    || { apt-get update -q; DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "linux-headers-$ARCH"; }
  tree=$(ls -d /usr/src/linux-headers-*-"$ARCH" 2>/dev/null | sort -V | tail -n 1)
  [ -n "$tree" ] || die "no kernel headers for $KVER and no linux-headers-$ARCH tree in /usr/src"
  common="${tree%-"$ARCH"}-common"
  mkdir -p "$KDIR"
  ln -sfn "$tree" "$KDIR/build"
  [ -d "$common" ] && ln -sfn "$common" "$KDIR/source"
  warn "FALLBACK: no headers package exists for the running kernel $KVER."
  warn "          $KDIR/build -> $tree (and source -> $common)."
  warn "          relay's eBPF programs use only stable uapi types (__sk_buff), which"
  warn "          compile and load this way; bcc tools that read kernel-internal"
  warn "          structs may not."
fi

step "bpffs at /sys/fs/bpf"
if mountpoint -q /sys/fs/bpf; then
  echo "mounted"
else
  mkdir -p /sys/fs/bpf && mount -t bpf bpf /sys/fs/bpf && echo "mounted now"
fi

step "virtual environment $VENV (sees Debian's bcc)"
if [ ! -x "$VENV/bin/python" ]; then
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -c 'import bcc' 2>/dev/null \
  || die "the venv cannot import bcc; is python3-bpfcc installed for /usr/bin/python3?"

step "relay package and its C build"
stamp="$VENV/.relay-build"
digest=$(cd "$ROOT" && find pyproject.toml setup.py cext ebpf -type f -print0 | sort -z \
  | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ] && "$VENV/bin/python" -c 'import relay.cext, chdb, clickhouse_connect' 2>/dev/null; then
  echo "up to date"
else
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e "$ROOT[test]"
  "$VENV/bin/python" -c 'import relay.cext' || die "the C module did not build"
  echo "$digest" > "$stamp"
  echo "built"
fi
step "a published VPN Gate list parser for the tests (npm vpn-gate, in $ROOT/.node)"
# tests/test_e2e_directory.py runs it against relay directory's CSV list.
VPNGATE_NPM="vpn-gate@2.1.2"
if [ -f "$ROOT/.node/node_modules/vpn-gate/lib/csvLoader.js" ]; then
  echo "present"
else
  command -v npm >/dev/null || { export DEBIAN_FRONTEND=noninteractive; apt-get update -q; \
    apt-get install -y -q --no-install-recommends nodejs npm; }
  npm install --no-audit --no-fund --silent --prefix "$ROOT/.node" "$VPNGATE_NPM" \
    || die "npm install $VPNGATE_NPM failed"
  echo "installed $VPNGATE_NPM"
fi
step "ready: $VENV/bin/relay"
