#!/usr/bin/env bash
# Installs what is missing, builds the collector, and runs it (as root: it loads eBPF).
# With no OTLP endpoint configured it writes one JSON line per connection to stdout.
# Extra arguments go to `egress-collector run`, e.g. scripts/run.sh --probe tracepoint
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release --bin egress-collector >&2
bin=target/release/egress-collector
if [ "$(id -u)" -eq 0 ]; then exec "$bin" run --stdout "$@"; else exec sudo "$bin" run --stdout "$@"; fi
