#!/usr/bin/env bash
# Make a local base image (Debian + Python 3.11) for docker/Dockerfile where no container registry is reachable:
# debootstrap a minimal Debian from an apt mirror and `docker import` it. Needs root (debootstrap, chroot), the
# debootstrap package and a running Docker daemon.
#
#   sudo docker/build-base-image.sh                      # -> infomamba-base:bookworm
#   docker build -f docker/Dockerfile --build-arg BASE_IMAGE=infomamba-base:bookworm ...
#
# Env: MIRROR (default http://deb.debian.org/debian; an apt proxy or local mirror works too), SECURITY_MIRROR
# (default http://deb.debian.org/debian-security; empty: no security suite), SUITE (bookworm: its python3 is 3.11,
# what requirements.lock is resolved for). The one argument is the image tag.
set -euo pipefail

TAG=${1:-infomamba-base:bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR-http://deb.debian.org/debian-security}
# What the Dockerfile's base stage looks for; with these present it runs no apt-get itself.
PACKAGES=python3,python3-venv,ca-certificates

if [ "$(id -u)" -ne 0 ]; then
    echo "build-base-image.sh: debootstrap needs root (run it with sudo)" >&2
    exit 1
fi
for tool in debootstrap docker; do
    command -v "$tool" >/dev/null || { echo "build-base-image.sh: $tool not found (apt-get install debootstrap docker.io)" >&2; exit 1; }
done

rootfs=$(mktemp -d /var/tmp/infomamba-rootfs.XXXXXX)
chmod 755 "$rootfs"  # it becomes the image's /
cleanup() {
    # A chroot's mounts must go before the tree does.
    umount -R "$rootfs/proc" 2>/dev/null || true
    rm -rf --one-file-system "$rootfs"
}
trap cleanup EXIT

debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR"

{
    echo "deb $MIRROR $SUITE main"
    echo "deb $MIRROR $SUITE-updates main"
    [ -z "$SECURITY_MIRROR" ] || echo "deb $SECURITY_MIRROR $SUITE-security main"
} > "$rootfs/etc/apt/sources.list"
# The release's point updates and security fixes: the image is served from, so it should not wait for a new tag.
chroot "$rootfs" /usr/bin/env DEBIAN_FRONTEND=noninteractive bash -c \
    'apt-get update -q && apt-get upgrade -y -q --no-install-recommends && apt-get clean'
# What a container never reads: package lists (apt-get update restores them), docs, man pages, locales, caches.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/debconf/*-old \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log \
    "$rootfs"/tmp/* "$rootfs"/root/.cache
find "$rootfs"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
: > "$rootfs/etc/resolv.conf"
: > "$rootfs/etc/hostname"

tar --numeric-owner --xattrs -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase $SUITE from $MIRROR (docker/build-base-image.sh)" \
    - "$TAG"
docker run --rm "$TAG" python3 -c 'import sys, venv, ensurepip, ssl; print(sys.version.split()[0])'
docker image ls "$TAG"
