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
# Leaks by design (the name interner's permanent names), listed with why.
export LSAN_OPTIONS="suppressions=$(pwd)/lsan-suppressions.txt${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
# Listed first, so a failing `cargo fuzz list` stops the script (set -e) instead of
# leaving an empty loop that reports success.
targets=$(cargo +nightly fuzz list)
ran=0
for target in $targets; do
  mkdir -p "corpus/$target"
  echo "fuzz: $target for ${seconds}s" >&2
  # Committed seeds (earlier findings) first, so every run starts from them.
  seeds=()
  if [ -d "seeds/$target" ]; then seeds=("seeds/$target"); fi
  output=$(cargo +nightly fuzz run --dev "$target" "corpus/$target" ${seeds[@]+"${seeds[@]}"} ../collector/src/enrich/runtime/fixtures \
    -- -max_total_time="$seconds" -print_final_stats=0 2>&1) \
    || { echo "$output" | grep -E "ERROR|panicked|SUMMARY" >&2 || true; echo "fuzz: $target failed; see fuzz/artifacts/$target" >&2; exit 1; }
  # libFuzzer ends a run that happened with "Done <n> runs".
  echo "$output" | grep -E "^Done [0-9]+ runs" >&2 \
    || { echo "$output" | tail -20 >&2; echo "fuzz: $target did not run" >&2; exit 1; }
  ran=$((ran + 1))
done
if [ "$ran" -eq 0 ]; then
  echo "fuzz: no fuzz target ran (cargo fuzz list found none in $(pwd))" >&2
  exit 1
fi
echo "fuzz: $ran targets ran for ${seconds}s each" >&2
