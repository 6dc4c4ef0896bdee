#!/usr/bin/env bash
# Runs every check and test. Installs the interoperability peers it needs (Debian
# packages, as root) when they are missing. This is what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")"

need=()
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
command -v qemu-io >/dev/null 2>&1 || need+=(qemu-utils)
command -v qemu-nbd >/dev/null 2>&1 || need+=(qemu-utils)
command -v vmdkinfo >/dev/null 2>&1 || need+=(libvmdk-utils)
command -v gcc >/dev/null 2>&1 || need+=(gcc)
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v valgrind >/dev/null 2>&1 || need+=(valgrind)
# Peak memory of a child process (GNU time: tests/tests/cli.rs streams huge maps).
[ -x /usr/bin/time ] || need+=(time)
# Kill points at exact system calls in the crash tests (tests/tests/crash_kill.rs).
command -v strace >/dev/null 2>&1 || need+=(strace)
# Partition and filesystem tools for the vdisk-mount tests.
PATH=$PATH:/usr/sbin:/sbin
command -v sfdisk >/dev/null 2>&1 || need+=(fdisk)
command -v mkfs.ext4 >/dev/null 2>&1 || need+=(e2fsprogs)
command -v mkfs.fat >/dev/null 2>&1 || need+=(dosfstools)
command -v mkswap >/dev/null 2>&1 || need+=(util-linux)
command -v mkfs.ntfs >/dev/null 2>&1 || need+=(ntfs-3g)
command -v mkfs.exfat >/dev/null 2>&1 || need+=(exfatprogs)
command -v mkfs.xfs >/dev/null 2>&1 || need+=(xfsprogs)
command -v mkfs.btrfs >/dev/null 2>&1 || need+=(btrfs-progs)
# NBD peers for vdisk-nbd (tests/tests/nbd_interop.rs).
command -v nbdinfo >/dev/null 2>&1 || need+=(libnbd-bin)
command -v nbdkit >/dev/null 2>&1 || need+=(nbdkit)
# Test certificates for NBD over TLS (tests/tests/nbd_tls.rs).
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# FUSE mounts (vdisk-mount) and FAT file access without a vfat kernel module.
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
command -v mcopy >/dev/null 2>&1 || need+=(mtools)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "run-tests: missing ${need[*]}: run as root (apt-get) or install them" >&2
    exit 1
  fi
  echo "run-tests: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo build (the interoperability tests run the vdiskmanager binary)"
cargo build --workspace
echo "== cargo test"
cargo test --workspace
echo "== C ABI: install libvixDiskLib, run the C sample and C tests (under valgrind)"
cargo build --release -p vdisk-utils -p vdisk-examples
./vdisk-ffi/install.sh target/vddk >/dev/null
bash tests/c/run.sh target/vddk
echo "== demo"
./run-demo.sh >/dev/null
echo "run-tests: all checks passed"
