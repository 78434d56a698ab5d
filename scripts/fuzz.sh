#!/usr/bin/env bash
# Runs every cargo-fuzz target for N seconds (default 10, what CI runs); by hand run longer,
# e.g. scripts/fuzz.sh 600. Seeds: the runtime fixtures; findings land in fuzz/artifacts/
# and get a regression test beside the parser.
# Debug build (--dev): quicker to build, and overflow checks turn silent wrap-arounds into
# findings.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cd fuzz
for target in $(cargo +nightly fuzz list); do
  mkdir -p "corpus/$target"
  echo "fuzz: $target for ${seconds}s" >&2
  cargo +nightly fuzz run --dev "$target" "corpus/$target" ../collector/src/enrich/runtime/fixtures \
    -- -max_total_time="$seconds" -print_final_stats=0 2>&1 | grep -E "^Done|ERROR|panicked|SUMMARY" >&2 \
    || { echo "fuzz: $target failed; see fuzz/artifacts/$target" >&2; exit 1; }
done
