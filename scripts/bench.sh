#!/usr/bin/env bash
# The benchmark: installs what is missing (setup.sh: bpftrace for the peer baseline), builds release
# binaries, and runs egress-bench, which writes BENCHMARKS.md and bench/results/.
# Extra arguments go to `egress-bench run`, e.g. scripts/bench.sh --repeat 1 --rates 0
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
  echo "bench: installing fonts-dejavu-core (plot labels)" >&2
  as_root=(); [ "$(id -u)" -eq 0 ] || as_root=(sudo)
  "${as_root[@]}" apt-get install -y -q fonts-dejavu-core >&2
fi
cargo build --release -p egress-collector -p egress-bench >&2
as_root=(); [ "$(id -u)" -eq 0 ] || as_root=(sudo)
exec "${as_root[@]}" target/release/egress-bench run --collector target/release/egress-collector "$@"
