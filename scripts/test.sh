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
step "benchmark smoke (seconds: loss accounting adds up)"
"${as_root[@]}" target/debug/egress-bench smoke --collector target/debug/egress-collector
step "fuzz targets (10 s each; scripts/fuzz.sh 600 by hand)"
./scripts/fuzz.sh 10
