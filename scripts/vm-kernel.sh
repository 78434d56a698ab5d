#!/usr/bin/env bash
# Fetches the newest Debian cloud kernel of a series for the VM tests and prints the path
# of its vmlinuz on stdout.
#
#   scripts/vm-kernel.sh 6.1|6.12|6.12-rt
#
# The kernel lands in ${EGRESS_CACHE_DIR:-$HOME/.cache/egress-collector}/kernels/<package>/,
# outside the repository. Idempotent: a kernel already extracted there is not fetched again.
# Logs go to stderr; on failure the last line says why and the exit status is non-zero.
set -euo pipefail

log() { printf 'vm-kernel: %s\n' "$*" >&2; }
die() { printf 'vm-kernel: error: %s\n' "$*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 6.1|6.12|6.12-rt"
series=$1
case "$series" in
  # 6.1 is bookworm's own kernel (ABI-numbered names); 6.12 is the newer kernel Debian
  # builds for bookworm (names carry "+deb12").
  6.1) pattern='^linux-image-6\.1\.0-[0-9]+-cloud-amd64$' ;;
  6.12) pattern='^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64$' ;;
  # PREEMPT_RT (mainline since 6.12): BPF programs can be preempted and nest on a CPU.
  6.12-rt) pattern='^linux-image-6\.12\.[0-9]+\+deb12-rt-amd64$' ;;
  *) die "unknown kernel series '$series' (want 6.1, 6.12 or 6.12-rt)" ;;
esac

cache=${EGRESS_CACHE_DIR:-$HOME/.cache/egress-collector}/kernels
mkdir -p "$cache" || die "cannot create the cache directory $cache"
cd "$cache"

# The VM tests fetch both series in parallel: one apt at a time (apt-get update takes a
# lock of its own and would fail rather than wait), and never two extractions of one package.
exec 9>"$cache/.lock"
flock 9

apt_updated=no
apt_update_once() {
  [ "$apt_updated" = no ] || return 1
  apt_updated=yes
  log "refreshing the apt package lists"
  apt-get update -qq >&2 || log "apt-get update failed; going on with the lists there are"
}

newest_package() {
  apt-cache search --names-only "$pattern" | cut -d' ' -f1 | sort -V | tail -n1
}

package=$(newest_package)
if [ -z "$package" ] && apt_update_once; then
  package=$(newest_package)
fi
[ -n "$package" ] || die "apt-cache knows no package matching $pattern"

dir="$cache/$package"
find_vmlinuz() {
  [ -d "$dir/boot" ] || return 0
  find "$dir/boot" -maxdepth 1 -name 'vmlinuz-*' -type f | head -n1
}

vmlinuz=$(find_vmlinuz)
if [ -n "$vmlinuz" ]; then
  log "using cached $package"
  printf '%s\n' "$vmlinuz"
  exit 0
fi

# Download into a scratch directory and move the result into place only when complete,
# so an interrupted run never leaves a half-extracted kernel that looks cached.
work=$(mktemp -d "$cache/.partial-$package.XXXXXX")
trap 'rm -rf "$work"' EXIT
# As root, apt-get download would drop to the _apt user, who cannot write under a 0700
# home: it then warns and downloads as root anyway. Say so up front instead.
apt_opts=(-q)
[ "$(id -u)" -ne 0 ] || apt_opts+=(-o APT::Sandbox::User=root)

download() { (cd "$work" && apt-get download "${apt_opts[@]}" "$package" >&2); }
log "downloading $package"
if ! download; then
  # Stale lists name a .deb the mirror no longer has: refresh them and try once more.
  apt_update_once || true
  download || die "apt-get download $package failed"
fi

deb=$(find "$work" -maxdepth 1 -name '*.deb' | head -n1)
[ -n "$deb" ] || die "apt-get download $package produced no .deb"
dpkg-deb -x "$deb" "$work/root" || die "cannot extract $deb"
# Keep the exact version for reports; the .deb itself is no longer needed.
dpkg-deb -f "$deb" Version >"$work/root/VERSION"
[ -n "$(find "$work/root/boot" -maxdepth 1 -name 'vmlinuz-*' -type f 2>/dev/null)" ] \
  || die "$package has no boot/vmlinuz-*"

rm -rf "$dir"
mv "$work/root" "$dir"
vmlinuz=$(find_vmlinuz)
log "extracted $package into $dir"
printf '%s\n' "$vmlinuz"
