#!/bin/sh
# Lays out an installed libvixDiskLib the way VDDK's distribution does:
#   PREFIX/lib64/libvixDiskLib.so.8.0.3  (the library, SONAME libvixDiskLib.so.8)
#   PREFIX/lib64/libvixDiskLib.so.8 -> libvixDiskLib.so.8.0.3
#   PREFIX/lib64/libvixDiskLib.so   -> libvixDiskLib.so.8
#   PREFIX/lib64/libvixDiskLib.a
#   PREFIX/lib64/pkgconfig/vixDiskLib.pc
#   PREFIX/include/vixDiskLib.h
# and the mount library (vdisk-ffi/mntapi):
#   PREFIX/lib64/libvixMntapi.so.1.0.0   (SONAME libvixMntapi.so.1)
#   PREFIX/lib64/libvixMntapi.so.1 -> libvixMntapi.so.1.0.0
#   PREFIX/lib64/libvixMntapi.so   -> libvixMntapi.so.1
#   PREFIX/lib64/pkgconfig/vixMntapi.pc
#   PREFIX/include/vixMntapi.h
# Usage: vdisk-ffi/install.sh PREFIX   (default: target/vddk)
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
prefix=${1:-$here/target/vddk}
version=8.0.3
mntapi_version=1.0.0
cd "$here"
cargo build --release -p vdisk-ffi -p vdisk-mntapi
mkdir -p "$prefix/lib64/pkgconfig" "$prefix/include"
prefix=$(cd "$prefix" && pwd)
install -m 0755 target/release/libvixDiskLib.so "$prefix/lib64/libvixDiskLib.so.$version"
ln -sf "libvixDiskLib.so.$version" "$prefix/lib64/libvixDiskLib.so.8"
ln -sf libvixDiskLib.so.8 "$prefix/lib64/libvixDiskLib.so"
install -m 0644 target/release/libvixDiskLib.a "$prefix/lib64/libvixDiskLib.a"
install -m 0644 include/vixDiskLib.h "$prefix/include/vixDiskLib.h"
cat > "$prefix/lib64/pkgconfig/vixDiskLib.pc" <<PC
prefix=$prefix
libdir=\${prefix}/lib64
includedir=\${prefix}/include

Name: vixDiskLib
Description: VMware VDDK disk library API (vdisk implementation, local files)
Version: $version
Libs: -L\${libdir} -lvixDiskLib
Libs.private: -lpthread -ldl -lm
Cflags: -I\${includedir}
PC
install -m 0755 target/release/libvixMntapi.so "$prefix/lib64/libvixMntapi.so.$mntapi_version"
ln -sf "libvixMntapi.so.$mntapi_version" "$prefix/lib64/libvixMntapi.so.1"
ln -sf libvixMntapi.so.1 "$prefix/lib64/libvixMntapi.so"
install -m 0644 include/vixMntapi.h "$prefix/include/vixMntapi.h"
cat > "$prefix/lib64/pkgconfig/vixMntapi.pc" <<PC
prefix=$prefix
libdir=\${prefix}/lib64
includedir=\${prefix}/include

Name: vixMntapi
Description: VMware VDDK disk mount API (vdisk implementation, local files; needs root to mount)
Version: $mntapi_version
Requires: vixDiskLib
Libs: -L\${libdir} -lvixMntapi
Cflags: -I\${includedir}
PC
echo "installed libvixDiskLib $version and libvixMntapi $mntapi_version in $prefix"
