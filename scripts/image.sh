#!/usr/bin/env bash
# Builds the runtime image egress-collector:latest offline: the Dockerfile's last stage
# (FROM scratch + the static binary), from a binary built here, so nothing is pulled.
# Also builds egress-test/busybox:latest, the demo's and tests' workload image, from
# Debian's busybox-static with `docker import`. Idempotent.
#   scripts/image.sh [--binary PATH]   use a static binary already built
set -euo pipefail
cd "$(dirname "$0")/.."
binary=""
if [ "${1:-}" = "--binary" ]; then binary="$2"; fi
if [ -z "$binary" ]; then
  ./scripts/setup.sh
  cargo build --release --target x86_64-unknown-linux-musl --bin egress-collector >&2
  binary=target/x86_64-unknown-linux-musl/release/egress-collector
fi
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp "$binary" "$context/egress-collector"
# The runtime stage of the Dockerfile, verbatim.
sed -n '/^FROM scratch/,$p' Dockerfile | sed 's/COPY --from=build /COPY /' > "$context/Dockerfile"
docker build -q -t egress-collector:latest "$context" >&2
if ! docker image inspect egress-test/busybox:latest >/dev/null 2>&1; then
  rootfs="$context/rootfs"
  mkdir -p "$rootfs/bin"
  cp "$(command -v busybox || echo /bin/busybox)" "$rootfs/bin/busybox"
  for applet in sh nc sleep echo cat wget; do ln -s busybox "$rootfs/bin/$applet"; done
  tar -C "$rootfs" -c . | docker import -c 'CMD ["/bin/sh"]' - egress-test/busybox:latest >&2
fi
docker image inspect -f '{{.Id}}' egress-collector:latest
