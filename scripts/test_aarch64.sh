#!/usr/bin/env bash
# The kernels' NEON path, checked on this x86-64 machine: cross-compile the
# model crate's kernel tests for aarch64 and run them under qemu-user (they
# compare the NEON kernels with the portable ones bit for bit). Installs
# the cross linker, qemu and the Rust target if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || ! command -v qemu-aarch64 >/dev/null 2>&1; then
    echo "== installing the aarch64 cross linker and qemu-user"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
fi
rustup target list --installed | grep -qx aarch64-unknown-linux-gnu || rustup target add aarch64-unknown-linux-gnu
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
# Release: candle's f16 GEMM dependency does not assemble for aarch64 in
# debug builds (sarah-quinones/gemm#31). A target dir of its own, beside
# the host build's.
TARGET_DIR="${CARGO_TARGET_DIR:-target}-aarch64"
# Without the `hub` feature: the kernels need no HTTP client (nor ring
# cross-compiled), and the build without it stays checked.
cargo test --release --target aarch64-unknown-linux-gnu --target-dir "$TARGET_DIR" -p tandem-model --no-default-features --lib kernels
