#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, and the end-to-end tests against
# this machine's kernel and Debian kernels booted under qemu (as root: they load eBPF).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

step() { printf '\n== %s\n' "$*" >&2; }

step "format"
cargo fmt --all -- --check
step "deployment files (kustomize render + Kubernetes schemas, Collector configs, compose, dashboard)"
python3 deploy/tests/validate.py
python3 deploy/tests/test_validate.py
step "lints"
cargo clippy --all-targets -- -D warnings
step "build"
cargo build --all-targets
step "tests (unit, host kernel, Debian kernels under qemu)"
as_root=()
[ "$(id -u)" -eq 0 ] || as_root=(sudo -E env "PATH=$PATH")
"${as_root[@]}" cargo test --all-targets --no-fail-fast -- --test-threads=2
step "benchmark smoke (seconds: loss accounting adds up; the kernel figure is produced)"
"${as_root[@]}" target/debug/egress-bench smoke --collector target/debug/egress-collector
# Kernel program time per connection from bpf_stats: checks that the figure comes out (the
# command fails when the collector's programs ran no time), not its value; a temp report.
kernel_report=$(mktemp)
trap 'rm -f "$kernel_report"' EXIT
"${as_root[@]}" target/debug/egress-bench kernel-cost --collectors target/debug/egress-collector \
  --peers none --connections 300 --repeat 1 --throughput-seconds 0 --report "$kernel_report"
grep -q '^| target/debug/egress-collector | [0-9]' "$kernel_report" \
  || { echo "test: kernel-cost wrote no figure to its report" >&2; exit 1; }
step "fuzz targets (10 s each; scripts/fuzz.sh 600 by hand)"
./scripts/fuzz.sh 10
