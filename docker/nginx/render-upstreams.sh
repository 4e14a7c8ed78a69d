#!/bin/sh
# Lists the replicas for nginx: one `server ADDRESS:PORT;` line per address that $INFOMAMBA_UPSTREAM resolves to
# (compose: the service name, which resolves to every replica of `--scale`; Kubernetes: a headless Service, which
# resolves to every ready pod), into upstream-servers.conf. Then, every $INFOMAMBA_UPSTREAM_REFRESH seconds,
# writes it again and reloads nginx when the set of replicas changed (0: write once and exit). nginx's image runs
# this from /docker-entrypoint.d/ before it starts nginx.
set -eu
name="${INFOMAMBA_UPSTREAM:-server}"
port="${INFOMAMBA_UPSTREAM_PORT:-8000}"
out="${INFOMAMBA_UPSTREAM_FILE:-/etc/nginx/upstream-servers.conf}"

render() {
    getent ahostsv4 "$name" | awk '$2 == "STREAM" {printf "server %s:'"$port"';\n", $1}' | sort -u
}

until servers="$(render)" && [ -n "$servers" ]; do
    echo "render-upstreams: waiting for $name to resolve" >&2
    sleep 1
done
printf '%s\n' "$servers" > "$out"
echo "render-upstreams: $(printf '%s\n' "$servers" | wc -l) replica(s) of $name" >&2
[ "${INFOMAMBA_UPSTREAM_REFRESH:-10}" = 0 ] && exit 0

(
    while sleep "${INFOMAMBA_UPSTREAM_REFRESH:-10}"; do
        servers="$(render)" || continue
        if [ -n "$servers" ] && [ "$servers" != "$(cat "$out")" ]; then
            printf '%s\n' "$servers" > "$out"
            echo "render-upstreams: replicas changed, reloading nginx" >&2
            nginx -s reload || true
        fi
    done
) &
