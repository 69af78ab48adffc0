#!/usr/bin/env bash
# Installs what the tests need, builds everything, and runs every test.
#
# Needs: the Rust toolchain (rustup). Installs: the wasm32-wasip2 target, and Debian's
# mosquitto and mosquitto-clients (the external broker the tests run against) when
# missing, which needs root.
set -euo pipefail
cd "$(dirname "$0")"

rustup target add wasm32-wasip2 >/dev/null

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v dpkg-query >/dev/null 2>&1 || { echo "test.sh: the tests need a Debian-based system (dpkg-query)" >&2; exit 1; }
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "test.sh: please install ${need[*]} (apt-get install ${need[*]}), or run as root" >&2
        exit 1
    fi
    echo "test.sh: installing ${need[*]}" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The package starts a system broker on port 1883; the tests start their own on free
# ports and never touch it.

echo "test.sh: building plugins (wasm32-wasip2)" >&2
# Plugins build into plugins/target whatever CARGO_TARGET_DIR says: the tests look there.
(cd plugins && CARGO_TARGET_DIR=target cargo build --release --locked)
echo "test.sh: testing plugin logic on the host" >&2
host=$(rustc -vV | sed -n 's/^host: //p')
(cd plugins && CARGO_TARGET_DIR=target cargo test --locked --target "$host")
echo "test.sh: building binaries" >&2
cargo build --workspace --bins --locked
echo "test.sh: running tests" >&2
cargo test --workspace --locked
