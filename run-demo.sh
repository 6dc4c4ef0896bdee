#!/usr/bin/env bash
# The main job: the backup flow end to end (a guest disk with an ext4 partition,
# change tracking, snapshot, non-persistent open, full and incremental backups to
# streamOptimized disks, consolidation, restore and byte-for-byte verification).
# Usage: ./run-demo.sh [DIR]   (DIR keeps the files; default: a temporary folder)
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
exec cargo run --quiet --release -p vdisk-examples --bin vdisk-demo -- "$@"
