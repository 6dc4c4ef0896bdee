#!/usr/bin/env bash
# The main job: the backup flow end to end (a guest disk with an ext4 partition,
# change tracking, snapshot, non-persistent open, full and incremental backups to
# streamOptimized disks, consolidation, restore and byte-for-byte verification).
# By default the backups are pulled over the network: a host serves the snapshot
# with vdisk-nbd (TLS on 127.0.0.1) and a proxy reads it through libvixDiskLib's
# nbdssl transport. --local keeps everything on the snapshot's files.
# Usage: ./run-demo.sh [--local] [DIR]   (DIR keeps the files; default: a temporary folder)
set -euo pipefail
cd "$(dirname "$0")"
# The demo builds its guest file system with e2fsprogs (mkfs.ext4, debugfs, e2fsck).
if ! command -v mkfs.ext4 >/dev/null 2>&1 && [ ! -x /sbin/mkfs.ext4 ] && [ ! -x /usr/sbin/mkfs.ext4 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq e2fsprogs >/dev/null
    else
        echo "run-demo.sh: mkfs.ext4 is needed: apt-get install e2fsprogs (as root)" >&2
        exit 1
    fi
fi
# The host's certificate is made with openssl.
if ! command -v openssl >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
    else
        echo "run-demo.sh: openssl is needed: apt-get install openssl (as root)" >&2
        exit 1
    fi
fi
# The host (vdisk-nbd) and the proxy (backup_proxy) run beside the demo.
cargo build --quiet --release -p vdisk-utils --bin vdisk-nbd -p vdisk-ffi --bin backup_proxy
exec cargo run --quiet --release -p vdisk-examples --bin vdisk-demo -- "$@"
