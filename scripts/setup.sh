#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build, run and test egress-collector.
# Idempotent: every step checks first and skips what is already there.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# Debian packages: LLVM 22 matches nightly rustc's LLVM (bpf-linker links against it),
# qemu + busybox-static boot the test kernels, iproute2 for test namespaces, musl-tools
# compiles the C parts of ring (TLS) for the static build those kernels run; nftables
# shapes the outcome tests' networks; libbpf-tools (tcplife, tcpconnect) and bpftrace are
# the benchmarks' peers (egress-bench run, kernel-cost, kernel-cost-vm); prometheus
# scrapes the collector's /metrics in collector/tests/prometheus.rs; dnsmasq-base is
# tests/dns.rs's real DNS server, iperf3 the DNS cost benchmark's bulk load.
apt_packages=(llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev qemu-system-x86 busybox-static cpio iproute2 curl musl-tools nftables libbpf-tools bpftrace prometheus dnsmasq-base iperf3)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq || log "apt-get update failed; trying the cached package lists"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v rustup >/dev/null 2>&1; then
  log "installing rustup"
  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi

rustup toolchain list | grep -q '^nightly' || { log "installing nightly toolchain"; rustup toolchain install nightly --profile minimal; }
rustup component list --toolchain nightly --installed | grep -q '^rust-src' \
  || { log "adding rust-src to nightly"; rustup component add rust-src --toolchain nightly; }
rustup target list --installed | grep -q x86_64-unknown-linux-musl \
  || { log "adding musl target"; rustup target add x86_64-unknown-linux-musl; }

if ! command -v bpf-linker >/dev/null 2>&1; then
  log "building bpf-linker against LLVM 22 (1-2 minutes)"
  LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 LLVM_PREFIX=/usr/lib/llvm-22 \
    cargo install --locked bpf-linker --no-default-features --features llvm-22
fi

# Deployment checks (deploy/tests): the Kubernetes schemas from PyPI. kubectl is optional
# (validate.py renders the kustomization itself and compares with kubectl's when present).
if ! python3 -c 'import kubernetes_validate, yaml' 2>/dev/null; then
  log "installing kubernetes-validate and PyYAML"
  python3 -m pip install -q -r "$(dirname "$0")/../deploy/tests/requirements.txt"
fi

# tracefs is where tracepoints live; some hosts do not mount it.
if [ ! -e /sys/kernel/tracing/events ] && [ "$(id -u)" -eq 0 ]; then
  mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || log "could not mount tracefs"
fi
log "ready"
