#!/usr/bin/env bash
# Builds the fanout container image: the host as a static musl binary in a
# FROM scratch image, with its compiled-component cache warmed here, at
# build time, so that a container answers its first request without
# compiling the guest.
#
#   deploy/image/build.sh [TAG]        (TAG defaults to fanout:latest)
#
# Needs podman or buildah. The musl target is added with rustup if missing.
set -euo pipefail
tag=${1:-fanout:latest}
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
triple=x86_64-unknown-linux-musl

if command -v podman >/dev/null; then
    build=(podman build)
elif command -v buildah >/dev/null; then
    build=(buildah bud)
else
    echo "neither podman nor buildah is installed (apt-get install podman)" >&2
    exit 1
fi

if ! rustc --print target-libdir --target "$triple" >/dev/null 2>&1 ||
    [ ! -d "$(rustc --print target-libdir --target "$triple")" ]; then
    rustup target add "$triple"
fi
cargo build --release --locked --target "$triple" -p fanout-host
binary="${CARGO_TARGET_DIR:-target}/$triple/release/fanout"

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
# Debug info out, symbols kept: panics still name their functions.
objcopy --strip-debug "$binary" "$context/fanout"
mkdir -m 0700 "$context/cache"
# The same binary as in the image compiles the guest into the cache: the
# entry's key is the component's hash and this engine's settings, so the
# container finds it. (On a CPU with other features than this one, the
# engine's settings differ and the container compiles at start instead.)
"$context/fanout" --check --cache-dir "$context/cache/fanout" --log-format json >/dev/null
"${build[@]}" --file deploy/image/Containerfile --tag "$tag" "$context"
echo "built $tag: $(podman image inspect --format '{{.Size}}' "$tag" 2>/dev/null || echo '?') bytes"
