#!/usr/bin/env bash
# Builds the runtime image (egress-collector:latest) offline: the Dockerfile's last stage
# (FROM scratch, which pulls nothing) taken verbatim, fed a static binary built here
# instead of by the build stage. Also builds egress-test/busybox:latest, the demo's and
# the tests' workload image, from Debian's busybox-static with `docker import`.
# Idempotent; prints the image id on stdout, everything else on stderr.
#   scripts/image.sh                  build the static binary, then the images
#   scripts/image.sh --binary PATH    use a static binary already built
#   scripts/image.sh --tag NAME       tag the image NAME (default egress-collector:latest)
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf 'image: %s\n' "$*" >&2; }

binary=""
tag=egress-collector:latest
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="${2:?--binary needs a path}"; shift 2 ;;
    --tag) tag="${2:?--tag needs a name}"; shift 2 ;;
    *) echo "usage: $0 [--binary PATH] [--tag NAME]" >&2; exit 2 ;;
  esac
done
if [ -z "$binary" ]; then
  ./scripts/setup.sh
  log "building the static binary"
  cargo build --release --target x86_64-unknown-linux-musl --bin egress-collector >&2
  binary=target/x86_64-unknown-linux-musl/release/egress-collector
fi
# FROM scratch has no dynamic loader: refuse an ELF that names one (a PT_INTERP header).
if ! python3 - "$binary" <<'PY'
import struct, sys
elf = open(sys.argv[1], "rb").read(1 << 16)
if elf[:4] != b"\x7fELF" or elf[4] != 2:
    sys.exit(1)
phoff, = struct.unpack_from("<Q", elf, 0x20)
size, count = struct.unpack_from("<HH", elf, 0x36)
sys.exit(any(struct.unpack_from("<I", elf, phoff + i * size)[0] == 3 for i in range(count)))
PY
then
  log "$binary is not a static 64-bit ELF binary (FROM scratch has no libc to load it with)"
  exit 1
fi
certs=/etc/ssl/certs/ca-certificates.crt
[ -r "$certs" ] || { log "$certs is missing (Debian's ca-certificates)"; exit 1; }

# The context holds what the build stage leaves in /out; the runtime stage copies from
# there, with `--from=build` dropped.
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
mkdir "$context/out"
cp "$binary" "$context/out/egress-collector"
cp "$certs" "$context/out/ca-certificates.crt"
sed -n '/^FROM scratch/,$p' Dockerfile | sed 's|^COPY --from=build /out/|COPY out/|' > "$context/Dockerfile"
if grep -q -- '--from=' "$context/Dockerfile"; then
  log "the Dockerfile's runtime stage copies from somewhere other than /out of the build stage"
  exit 1
fi
log "building $tag from $binary"
docker build -q -t "$tag" "$context" >/dev/null

if ! docker image inspect egress-test/busybox:latest >/dev/null 2>&1; then
  busybox=$(command -v busybox || echo /bin/busybox)
  [ -x "$busybox" ] || { log "busybox-static is not installed (scripts/setup.sh installs it)"; exit 1; }
  log "building egress-test/busybox:latest from $busybox"
  rootfs="$context/rootfs"
  mkdir -p "$rootfs/bin"
  cp "$busybox" "$rootfs/bin/busybox"
  for applet in sh nc sleep echo cat wget; do ln -s busybox "$rootfs/bin/$applet"; done
  tar -C "$rootfs" -c . | docker import -c 'CMD ["/bin/sh"]' - egress-test/busybox:latest >/dev/null
fi
docker image inspect -f '{{.Id}}' "$tag"
