# egress-collector image for users with a registry: `docker build -t egress-collector .`
# Offline (no base image can be pulled), scripts/image.sh builds the same runtime image
# from a locally built static binary.

# Build: nightly with rust-src and bpf-linker for the eBPF object, musl for a static binary.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends lsb-release wget gnupg musl-tools \
 && wget -qO- https://apt.llvm.org/llvm-snapshot.gpg.key > /etc/apt/trusted.gpg.d/apt.llvm.org.asc \
 && echo "deb http://apt.llvm.org/bookworm/ llvm-toolchain-bookworm-22 main" > /etc/apt/sources.list.d/llvm.list \
 && apt-get update \
 && apt-get install -y --no-install-recommends llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
RUN rustup toolchain install nightly --component rust-src \
 && rustup target add x86_64-unknown-linux-musl \
 && cargo install bpf-linker --no-default-features --features llvm-22
WORKDIR /src
COPY . .
RUN cargo build --release --target x86_64-unknown-linux-musl --bin egress-collector \
 && cp target/x86_64-unknown-linux-musl/release/egress-collector /egress-collector

# Runtime: the static binary alone. No shell, no package manager, nothing to patch.
FROM scratch
COPY --from=build /egress-collector /egress-collector
ENTRYPOINT ["/egress-collector"]
CMD ["run"]
