#!/usr/bin/env bash
# Build the CPU image and smoke-test it: the server starts without Triton, /health and /ready answer 200, one
# /v1/completions is served behind the API key (and refused without it), and a model the container cannot read
# (mode 0600) makes it exit instead of reporting healthy. Prints the image size and the build time.
# Needs a running Docker daemon; not part of `make test` (CI has no daemon, and a cold build takes minutes).
#
#   make image-check                                   # or docker/image-check.sh
#
# Env (all optional):
#   BASE_IMAGE       default: infomamba-base:bookworm when that image exists (docker/build-base-image.sh makes it
#                    where no registry is reachable), python:3.11-slim otherwise
#   TORCH_WHEEL_DIR  a directory holding torch's CPU wheel (torch-<TORCH_VERSION>+cpu-*.whl): served to the build
#                    over 127.0.0.1 instead of download.pytorch.org (the build then uses the host's network)
#   TORCH_INDEX_URL  default https://download.pytorch.org/whl/cpu (ignored with TORCH_WHEEL_DIR)
#   TORCH_VERSION    default: the Makefile's pin
#   PIP_INDEX_URL    a package mirror
#   CA_CERT_FILE     PEM file of a TLS-intercepting proxy's CA (or a mirror's), trusted by pip during the build
#   TAG              default infomamba-serve:cpu;  PORT  host port for the smoke run (default 18000);
#   WHEEL_PORT       the port TORCH_WHEEL_DIR is served on (default 18765)
#   NO_CACHE=1       build from scratch (measures a cold build)
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${TAG:-infomamba-serve:cpu}
PORT=${PORT:-18000}
TORCH_VERSION=${TORCH_VERSION:-$(sed -n 's/^TORCH ?= torch==//p' Makefile)}
API_KEY=image-check-key
NAME=infomamba-image-check-$$

fail() { echo "image-check: FAIL: $*" >&2; exit 1; }

docker info >/dev/null 2>&1 || fail "no Docker daemon answers (start it: systemctl start docker, or dockerd &)"

if [ -z "${BASE_IMAGE:-}" ]; then
    if docker image inspect infomamba-base:bookworm >/dev/null 2>&1; then
        BASE_IMAGE=infomamba-base:bookworm
    else
        BASE_IMAGE=python:3.11-slim
    fi
fi

server_pid=""
cleanup() {
    docker rm -f "$NAME" "$NAME-0600" >/dev/null 2>&1 || true
    [ -z "$server_pid" ] || kill "$server_pid" 2>/dev/null || true
    [ -z "${models:-}" ] || rm -rf "$models"
}
trap cleanup EXIT

args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
if [ -n "${TORCH_WHEEL_DIR:-}" ]; then
    wheel_port=${WHEEL_PORT:-18765}  # fixed: the URL is a build arg, and a new one would defeat the build cache
    python3 -m http.server "$wheel_port" --bind 127.0.0.1 --directory "$TORCH_WHEEL_DIR" >/dev/null 2>&1 &
    server_pid=$!
    for _ in 1 2 3 4 5; do curl -sf -o /dev/null "http://127.0.0.1:$wheel_port/" && break; sleep 1; done
    kill -0 "$server_pid" 2>/dev/null \
        || fail "cannot serve $TORCH_WHEEL_DIR on 127.0.0.1:$wheel_port (port in use? set WHEEL_PORT)"
    # The local wheel carries the +cpu label; asking for it fails loudly if the directory lacks it.
    args+=(--network host --build-arg "PIP_FIND_LINKS=http://127.0.0.1:$wheel_port/"
           --build-arg "TORCH_VERSION=$TORCH_VERSION+cpu")
else
    args+=(--build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
           --build-arg "TORCH_VERSION=$TORCH_VERSION")
fi
[ -z "${PIP_INDEX_URL:-}" ] || args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")
[ -z "${CA_CERT_FILE:-}" ] || args+=(--build-arg "CA_CERT=$(cat "$CA_CERT_FILE")")
[ -z "${NO_CACHE:-}" ] || args+=(--no-cache)

echo "image-check: building $TAG on $BASE_IMAGE"
start=$(date +%s)
docker build -f docker/Dockerfile -t "$TAG" "${args[@]}" . > /tmp/"$NAME".build.log 2>&1 \
    || { tail -30 /tmp/"$NAME".build.log >&2; fail "docker build (log: /tmp/$NAME.build.log)"; }
build_s=$(( $(date +%s) - start ))
rm -f /tmp/"$NAME".build.log
size_mb=$(( $(docker image inspect --format '{{.Size}}' "$TAG") / 1000000 ))

docker run --rm "$TAG" python3 -c 'import importlib.util as u, sys; sys.exit(u.find_spec("triton") is not None)' \
    || fail "triton is installed in the CPU image"

docker run -d --name "$NAME" -p "127.0.0.1:$PORT:8000" -e INFOMAMBA_API_KEY="$API_KEY" "$TAG" >/dev/null
start=$(date +%s)
until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/ready")" = 200 ]; do
    [ "$(docker inspect --format '{{.State.Running}}' "$NAME")" = true ] || { docker logs "$NAME" >&2; fail "the server exited"; }
    [ $(( $(date +%s) - start )) -lt 180 ] || { docker logs "$NAME" >&2; fail "/ready not 200 within 180 s"; }
    sleep 1
done
ready_s=$(( $(date +%s) - start ))
curl -sf "http://127.0.0.1:$PORT/health" | python3 -c 'import json, sys; b = json.load(sys.stdin); assert b["status"] == "ok", b' \
    || fail "/health"
curl -sf -H "Authorization: Bearer $API_KEY" -H 'Content-Type: application/json' \
    -d '{"prompt": "def ", "max_tokens": 16, "temperature": 0}' "http://127.0.0.1:$PORT/v1/completions" \
    | python3 -c 'import json, sys; b = json.load(sys.stdin); t = b["choices"][0]["text"]; assert b["usage"]["completion_tokens"] == 16, b; print("image-check: completion:", repr(t))' \
    || fail "/v1/completions"
code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' -d '{"prompt": "a", "max_tokens": 1}' \
    "http://127.0.0.1:$PORT/v1/completions")
[ "$code" = 401 ] || fail "/v1/completions without the API key answered $code, not 401"

# A model converted by an older version (or copied under umask 077) is 0600: uid 1000 cannot read it, and the
# container must say so and stop rather than stay up and healthy.
models=$(mktemp -d)
cp -r model/default_model "$models/unreadable"
chmod 755 "$models"
chmod 600 "$models"/unreadable/*
docker run -d --name "$NAME-0600" -v "$models:/models:ro" -e INFOMAMBA_MODEL=/models/unreadable "$TAG" >/dev/null
status=""
for _ in $(seq 1 90); do
    status=$(docker inspect --format '{{.State.Status}}' "$NAME-0600")
    [ "$status" = running ] || break
    sleep 1
done
[ "$status" = exited ] || fail "a container with an unreadable model is still $status after 90 s"
docker logs "$NAME-0600" 2>&1 | grep -q 'Permission denied' || fail "the unreadable model's error is not in the logs"

echo "image-check: OK $TAG base=$BASE_IMAGE size=${size_mb}MB build=${build_s}s ready=${ready_s}s"
