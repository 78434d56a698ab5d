# egress-collector image, for users with a registry:
#   docker build -t <registry>/egress-collector:<version> .
# Offline (no base image can be pulled), scripts/image.sh builds the same runtime stage
# from a binary built on the host, so this file's last stage is the one source of truth.

# Build: what scripts/setup.sh installs on Debian 12. Nightly with rust-src builds the eBPF
# object (collector/build.rs), bpf-linker links it against LLVM 22 (Debian's llvm-22-dev,
# from bookworm-security, matching nightly rustc's LLVM), and musl-tools compiles ring's C
# for the static musl binary.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev musl-tools ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN rustup toolchain install nightly --profile minimal --component rust-src \
 && rustup target add x86_64-unknown-linux-musl \
 && LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 LLVM_PREFIX=/usr/lib/llvm-22 \
      cargo install --locked bpf-linker --no-default-features --features llvm-22
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl --bin egress-collector \
 && mkdir /out \
 && cp target/x86_64-unknown-linux-musl/release/egress-collector /out/egress-collector \
 && cp /etc/ssl/certs/ca-certificates.crt /out/ca-certificates.crt

# Runtime: the static binary and the CA bundle (the system roots it trusts when it
# exports over TLS itself, without the sidecar), nothing else: no shell, no package
# manager. Runs as root for the runtime's root-owned files; its privileges are the
# capabilities the DaemonSet grants (deploy/daemonset.yaml).
FROM scratch
COPY --from=build /out/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/egress-collector /egress-collector
ENTRYPOINT ["/egress-collector"]
CMD ["run"]
