#!/usr/bin/env bash
# Copies this machine's redis-server and nginx (Debian packages), with every shared library they load and the
# dynamic loader, into .bin/ (git-ignored) so they run on a machine without the packages, e.g. the GPU machine
# for `bench_scale.py --only-replicas`: carry .bin and put it first on PATH there. The wrappers start each binary
# through the carried loader, so the other machine's C library does not matter.
# Usage: bash bench/carry_binaries.sh   then, on the other machine: PATH=$PWD/.bin:$PATH python3 bench/...
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.bin/' .git/info/exclude 2>/dev/null || echo '/.bin/' >> .git/info/exclude
rm -rf .bin && mkdir -p .bin/real .bin/lib
for name in redis-server nginx; do
    path=$(command -v "$name" || ls "/usr/sbin/$name" 2>/dev/null) || { echo "no $name: apt-get install $name" >&2; exit 1; }
    cp "$path" ".bin/real/$name"
    ldd "$path" | awk '$3 ~ /^\// {print $3}' | xargs -r -I{} cp -L {} .bin/lib/
    # shellcheck disable=SC2016  # the wrapper's own expansions, written literally
    printf '#!/bin/sh\nD=$(dirname "$(readlink -f "$0")")\nexec "$D/lib/ld-linux-x86-64.so.2" --library-path "$D/lib" "$D/real/%s" "$@"\n' \
        "$name" > ".bin/$name"
    chmod +x ".bin/$name"
done
cp -L /lib64/ld-linux-x86-64.so.2 .bin/lib/
.bin/redis-server --version && .bin/nginx -v
du -sh .bin
