# fanout's everyday commands. The README's two commands (cargo run --release,
# cargo test) need none of this; `pip install rust-just` gets `just`.

set shell := ["bash", "-euo", "pipefail", "-c"]

guest_wasm := "target/wasm32-wasip2/wasm/fanout_guest.wasm"

# List the recipes.
default:
    @just --list

# Build the guest component into target/wasm32-wasip2/wasm/fanout_guest.wasm.
build-guest:
    cargo build -p fanout-guest --target wasm32-wasip2 --profile wasm
    @ls -l {{guest_wasm}}

# Serve the aggregator on 127.0.0.1:8080 with the in-process demo upstreams.
run *ARGS:
    cargo run --release -- {{ARGS}}

# The whole test suite: guest unit tests, host integration tests, doc tests.
test:
    cargo test

# Formatting and lints, as CI runs them.
lint:
    cargo fmt --all -- --check
    cargo clippy --all-targets -- -D warnings
    cargo clippy --target wasm32-wasip2 -p fanout-guest -p fanout-test-guests -- -D warnings
    cargo clippy --target wasm32-wasip2 -p fanout-guest-p3 -- -D warnings

# Run the component under `wasmtime serve`, with the demo upstreams on a socket.
serve-wasmtime addr="127.0.0.1:8081" upstreams="127.0.0.1:9000": build-guest
    #!/usr/bin/env bash
    set -euo pipefail
    if ! command -v wasmtime >/dev/null; then
        echo "wasmtime is not on PATH: cargo install wasmtime-cli --version 48.0.8 --locked" >&2
        exit 1
    fi
    cargo build --release -p fanout-host
    target/release/fanout --demo-upstreams-only --listen {{upstreams}} &
    trap 'kill $!' EXIT
    echo "try: curl -s http://{{addr}}/products/42"
    wasmtime serve -Scli --addr {{addr}} \
        --env FANOUT_UPSTREAM_INVENTORY=http://{{upstreams}} \
        --env FANOUT_UPSTREAM_PRICING=http://{{upstreams}} \
        --env FANOUT_UPSTREAM_REVIEWS=http://{{upstreams}} \
        {{guest_wasm}}

# The container image: a static (musl) fanout in a FROM scratch image, its
# compiled-component cache warmed at build time (podman or buildah).
image tag="fanout:latest":
    deploy/image/build.sh {{tag}}

# Every benchmark scenario (~16 minutes): BENCHMARKS.md, bench/results.json, bench/latency.svg.
bench *ARGS:
    cargo run -p fanout-bench --release -- all {{ARGS}}
