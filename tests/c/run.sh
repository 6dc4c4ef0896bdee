#!/usr/bin/env bash
# tests/c/run.sh LAYOUT - the C ABI tests of libvixDiskLib (and, in
# tests/c/mntapi.sh, of libvixMntapi).
#
# LAYOUT is an installed VDDK-like tree: LAYOUT/include/vixDiskLib.h and
# LAYOUT/lib64/libvixDiskLib.so.8 (with the libvixDiskLib.so link), and
# vixMntapi.h / libvixMntapi.so.1 beside them.
#
# Builds, with gcc -std=c99 -Wall -Wextra -Werror:
#   tests/c/struct_layout.c      sizes/offsets/constants against the VDDK ABI
#   examples/c/vixDiskLibSample.c  VMware-style sample (linked with -lvixDiskLib)
#   tests/c/nbdkit_like.c        dlopen + nbdkit >= 1.44's call sequence
# checks the header also as C++ (g++ -fsyntax-only), then runs them against
# disks of every type made by vdiskmanager and qemu-img and compares what they
# read, write and report with qemu-img (convert, compare, map). tests/c/remote.sh
# runs the checks again over the nbd and nbdssl transports (vdisk-nbd, qemu-nbd,
# nbdkit file).
#
# Every C program runs under valgrind (--error-exitcode=9, definite leaks are
# errors) when valgrind is installed; as root it is installed with apt-get if
# missing. Environment:
#   VALGRIND=0          do not use valgrind
#   VDISKMANAGER=path   vdiskmanager binary (default: target/release/vdiskmanager)
#   VDISK_NBD=path      vdisk-nbd binary (default: target/release/vdisk-nbd)
#   KEEP=1              keep the work directory
#
# Exit status 0 when everything passed; otherwise the failures are listed.

set -u
export LC_ALL=C

if [ $# -ne 1 ] || [ ! -d "$1" ]; then
    echo "usage: $0 LAYOUT_DIR   (with LAYOUT_DIR/include and LAYOUT_DIR/lib64)" >&2
    exit 2
fi

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
layout=$(cd "$1" && pwd)
inc=$layout/include
lib=$layout/lib64
vdm=${VDISKMANAGER:-$root/target/release/vdiskmanager}
work=$(mktemp -d "${TMPDIR:-/tmp}/vddk-c-tests.XXXXXX")

failures=()
passes=0

fail() {
    echo "FAIL: $*"
    failures+=("$*")
}

pass() {
    echo "ok: $*"
    passes=$((passes + 1))
}

finish() {
    echo
    echo "== C ABI tests: $passes passed, ${#failures[@]} failed (work dir $work)"
    if [ ${#failures[@]} -ne 0 ]; then
        local f
        for f in "${failures[@]}"; do
            echo "  FAILED: $f"
        done
        exit 1
    fi
    if [ "${KEEP:-0}" != 1 ]; then
        rm -rf "$work"
    fi
    exit 0
}

# Shows the end of a command's captured output.
show() {
    local name=$1
    echo "    ---- $name: stdout (tail)"
    tail -n 15 "$work/log/$name.out" 2>/dev/null | sed 's/^/    | /'
    echo "    ---- $name: stderr (tail)"
    tail -n 25 "$work/log/$name.err" 2>/dev/null | sed 's/^/    | /'
    echo "    ----"
}

# ---------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------

for tool in gcc g++ qemu-img qemu-io python3 xxd cmp readelf nm; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "run.sh: $tool is required" >&2
        exit 2
    fi
done
if [ ! -x "$vdm" ]; then
    echo "run.sh: $vdm not found (cargo build --release -p vdisk-utils)" >&2
    exit 2
fi

VG=()
if [ "${VALGRIND:-1}" != 0 ]; then
    if ! command -v valgrind >/dev/null 2>&1 && [ "$(id -u)" = 0 ] &&
        command -v apt-get >/dev/null 2>&1; then
        echo "installing valgrind"
        apt-get install -y valgrind >/dev/null 2>&1 ||
            { apt-get update >/dev/null 2>&1 && apt-get install -y valgrind >/dev/null 2>&1; }
    fi
    if command -v valgrind >/dev/null 2>&1; then
        VG=(valgrind -q --error-exitcode=9 --leak-check=full
            --errors-for-leak-kinds=definite --show-leak-kinds=definite
            --track-fds=no --num-callers=30)
        echo "using $(valgrind --version)"
    else
        echo "valgrind not available: running without it"
    fi
fi

mkdir -p "$work/log" "$work/bin"

# run NAME CMD... : runs CMD (under valgrind), output in log/NAME.{out,err};
# sets $rc.
run() {
    local name=$1
    shift
    "${VG[@]}" "$@" >"$work/log/$name.out" 2>"$work/log/$name.err"
    rc=$?
    return 0
}

# ok NAME CMD... : CMD must exit 0 without valgrind errors.
ok() {
    local name=$1
    run "$@"
    if [ "$rc" -eq 0 ]; then
        return 0
    fi
    if [ "$rc" -eq 9 ] && [ ${#VG[@]} -ne 0 ]; then
        fail "$name: valgrind reported errors (exit 9): ${*:2}"
    elif [ "$rc" -ge 128 ]; then
        fail "$name: killed by signal $((rc - 128)): ${*:2}"
    else
        fail "$name: exit status $rc: ${*:2}"
    fi
    show "$name"
    return 1
}

# refused NAME CMD... : CMD must fail cleanly (exit status 1, no crash, no
# valgrind error) and print the library's error text.
refused() {
    local name=$1
    run "$@"
    if [ "$rc" -eq 1 ]; then
        return 0
    fi
    if [ "$rc" -eq 0 ]; then
        fail "$name: succeeded but should have failed: ${*:2}"
    elif [ "$rc" -eq 9 ] && [ ${#VG[@]} -ne 0 ]; then
        fail "$name: valgrind reported errors (exit 9): ${*:2}"
    else
        fail "$name: exit status $rc (expected a clean failure, 1): ${*:2}"
    fi
    show "$name"
    return 1
}

# nbd NAME ARGS... : runs nbdkit_like like ok(), but when it exits 1 (its own
# checks failed, already reported) its outputs are still compared.
nbd() {
    local name=$1
    ok "$@" && return 0
    [ "$rc" -eq 1 ] && grep -q '^nbdkit_like: FAILED' "$work/log/$name.out"
}

# ---------------------------------------------------------------------------
# Header, library file and builds
# ---------------------------------------------------------------------------

echo "== header and library"
CFLAGS=(-std=c99 -Wall -Wextra -Werror -O2 -g -I "$inc")
LINK=(-L "$lib" -Wl,-rpath,"$lib" -lvixDiskLib -pthread)

if [ ! -f "$inc/vixDiskLib.h" ]; then
    fail "$inc/vixDiskLib.h is missing"
    finish
fi
if gcc -std=c99 -Wall -Wextra -Werror -fsyntax-only -x c "$inc/vixDiskLib.h" \
    >"$work/log/header-c.err" 2>&1; then
    pass "vixDiskLib.h compiles as C99 (-Wall -Wextra -Werror)"
else
    fail "vixDiskLib.h does not compile as C99"
    cat "$work/log/header-c.err"
fi
if g++ -x c++ -fsyntax-only -Wall -Wextra -Werror "$inc/vixDiskLib.h" \
    >"$work/log/header-cxx.err" 2>&1; then
    pass "vixDiskLib.h compiles as C++"
else
    fail "vixDiskLib.h does not compile as C++"
    cat "$work/log/header-cxx.err"
fi
# Informational: stricter modes real clients may use.
for mode in "-std=c89 -pedantic" "-std=c11 -pedantic" "-std=gnu89"; do
    # shellcheck disable=SC2086
    if ! gcc $mode -Wall -fsyntax-only -x c "$inc/vixDiskLib.h" \
        >"$work/log/header-extra.err" 2>&1; then
        echo "note: vixDiskLib.h does not compile with gcc $mode:"
        head -n 5 "$work/log/header-extra.err"
    fi
done

so=$lib/libvixDiskLib.so.8
if [ -e "$so" ]; then
    soname=$(readelf -d "$so" | sed -n 's/.*Library soname: \[\(.*\)\].*/\1/p')
    if [ "$soname" = libvixDiskLib.so.8 ]; then
        pass "SONAME of $so is libvixDiskLib.so.8"
    else
        fail "SONAME of $so is '$soname', expected libvixDiskLib.so.8"
    fi
else
    fail "$so does not exist"
fi
if [ ! -e "$lib/libvixDiskLib.so" ]; then
    fail "$lib/libvixDiskLib.so (link-time name) does not exist"
fi
if [ -e "$so" ]; then
    missing=()
    exported=$(nm -D --defined-only "$so" | awk '$2 == "T" || $2 == "W" || $2 == "i" {print $3}')
    for fn in InitEx Init Exit ListTransportModes Cleanup Connect PrepareForAccess \
        ConnectEx Disconnect EndAccess Create CreateChild Open QueryAllocatedBlocks \
        FreeBlockList GetInfo FreeInfo GetTransportMode Close Read ReadAsync Write \
        WriteAsync Flush Wait ReadMetadata WriteMetadata GetMetadataKeys Unlink Grow \
        Shrink Defragment Rename Clone GetErrorText FreeErrorText IsAttachPossible \
        Attach SpaceNeededForClone CheckRepair GetConnectParams FreeConnectParams \
        AllocateConnectParams; do
        if ! grep -qx "VixDiskLib_$fn" <<<"$exported"; then
            missing+=("VixDiskLib_$fn")
        fi
    done
    if [ ${#missing[@]} -eq 0 ]; then
        pass "all 43 documented VixDiskLib_ functions are exported"
    else
        fail "not exported: ${missing[*]}"
    fi
fi

echo "== builds"
if gcc "${CFLAGS[@]}" "$here/struct_layout.c" -o "$work/bin/struct_layout" "${LINK[@]}" \
    >"$work/log/build-struct_layout.err" 2>&1; then
    pass "struct_layout builds (compile-time layout and prototype checks)"
else
    # Constants the header lacks: name them, then define them (with the
    # documented values) so that every other check still runs.
    : >"$work/missing.h"
    missing=$(sed -n "s/.*'\([A-Za-z0-9_]*\)' undeclared.*/\1/p" \
        "$work/log/build-struct_layout.err" | sort -u)
    for name in $missing; do
        value=$(sed -n "s/^ *CONST($name, \(.*\));$/\1/p" "$here/struct_layout.c" | head -n 1)
        [ -n "$value" ] && echo "#define $name $value" >>"$work/missing.h"
    done
    if [ -n "$missing" ]; then
        fail "vixDiskLib.h lacks documented constants: $(echo $missing)"
    fi
    if gcc "${CFLAGS[@]}" -include "$work/missing.h" "$here/struct_layout.c" \
        -o "$work/bin/struct_layout" "${LINK[@]}" >"$work/log/build-struct_layout2.err" 2>&1; then
        [ -n "$missing" ] && echo "(struct_layout built with the missing constants defined)"
    else
        fail "struct_layout does not build: compile-time layout or prototype checks failed"
        grep -E 'error|note: in expansion of macro .(SIZE|FIELD|ALIGN)' \
            "$work/log/build-struct_layout2.err" | head -n 60
        # The run-time report names every mismatch.
        if gcc -std=c99 -w -O2 -I "$inc" -include "$work/missing.h" -DLAYOUT_RUNTIME_ONLY \
            -DLAYOUT_NO_LINK "$here/struct_layout.c" -o "$work/bin/struct_layout" \
            >"$work/log/build-struct_layout-rt.err" 2>&1; then
            echo "(built again with -DLAYOUT_RUNTIME_ONLY -DLAYOUT_NO_LINK for the report)"
        else
            rm -f "$work/bin/struct_layout"
        fi
    fi
fi
if gcc -std=c99 -w -fsyntax-only -I "$inc" -DLAYOUT_ALL_ERROR_CODES \
    "$here/struct_layout.c" >/dev/null 2>&1; then
    :
else
    echo "note: the header lacks some VIX error codes a disk library never returns" \
        "(VM/XML/crypto/mount/HTTP ranges; see -DLAYOUT_ALL_ERROR_CODES)"
fi
if gcc "${CFLAGS[@]}" "$root/examples/c/vixDiskLibSample.c" -o "$work/bin/vixDiskLibSample" \
    "${LINK[@]}" >"$work/log/build-sample.err" 2>&1; then
    pass "vixDiskLibSample builds"
else
    fail "vixDiskLibSample does not build"
    head -n 40 "$work/log/build-sample.err"
fi
if gcc "${CFLAGS[@]}" "$here/nbdkit_like.c" -o "$work/bin/nbdkit_like" -ldl -pthread \
    >"$work/log/build-nbdkit_like.err" 2>&1; then
    pass "nbdkit_like builds"
else
    fail "nbdkit_like does not build"
    head -n 40 "$work/log/build-nbdkit_like.err"
fi
if [ ! -x "$work/bin/vixDiskLibSample" ] || [ ! -x "$work/bin/nbdkit_like" ]; then
    finish
fi
sample=$work/bin/vixDiskLibSample
nbd=$work/bin/nbdkit_like

echo "== struct_layout"
if [ -x "$work/bin/struct_layout" ]; then
    if ok struct_layout "$work/bin/struct_layout" &&
        grep -q '^struct layout OK' "$work/log/struct_layout.out"; then
        pass "struct_layout: $(head -n 1 "$work/log/struct_layout.out")"
    else
        grep MISMATCH "$work/log/struct_layout.out"
        fail "struct_layout reported mismatches"
    fi
fi

echo "== nbdkit dump-plugin"
if ok dump-plugin "$nbd" "$layout" dump-plugin; then
    dll=$(sed -n 's/^vddk_dll=//p' "$work/log/dump-plugin.out")
    if [ -n "$dll" ] && [ -f "$dll" ] && grep -q '^vddk_transport_modes=.*file' \
        "$work/log/dump-plugin.out" && grep -q '^VixDiskLib_Open=1' "$work/log/dump-plugin.out"; then
        pass "dump-plugin: vddk_dll=$dll, $(grep '^vddk_transport_modes' "$work/log/dump-plugin.out")"
    else
        fail "dump-plugin output incomplete"
        show dump-plugin
    fi
fi

# ---------------------------------------------------------------------------
# Helpers for the disk tests
# ---------------------------------------------------------------------------

# qemu's view of a disk as raw: qraw DISK OUT [single]
qraw() {
    if [ "${3:-}" = single ]; then
        qemu-img convert -O raw \
            "json:{\"driver\":\"vmdk\",\"file\":{\"driver\":\"file\",\"filename\":\"$1\"},\"backing\":null}" "$2"
    else
        qemu-img convert -O raw "$1" "$2"
    fi
}

qmap() {
    if [ "${3:-}" = single ]; then
        qemu-img map --output=json \
            "json:{\"driver\":\"vmdk\",\"file\":{\"driver\":\"file\",\"filename\":\"$1\"},\"backing\":null}" >"$2"
    else
        qemu-img map --output=json "$1" >"$2"
    fi
}

# compare_blocks NAME BLOCKS MAPJSON CAPACITY_SECTORS
# nbdkit_like's "block OFF LEN" lines (sectors) against qemu-img map's data
# ranges rounded out to 128-sector chunks, over the queryable part of the disk.
# A range that reads as zeros is not data: qemu-img says "data": true, "zero": true
# for the holes of a flat extent's file, which the library reports unallocated.
compare_blocks() {
    python3 - "$@" <<'EOF'
import json, sys
name, blocks_path, map_path, capacity = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
CHUNK = 128
end = capacity // CHUNK * CHUNK

def merge(ranges):
    out = []
    for s, e in sorted(ranges):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out

ours = []
tail = None
for line in open(blocks_path):
    f = line.split()
    if f and f[0] == "block":
        ours.append((int(f[1]), int(f[1]) + int(f[2])))
    elif f and f[0] == "tail":
        tail = (int(f[1]), int(f[2]))
ours = merge(ours)

theirs = []
for e in json.load(open(map_path)):
    if not e.get("data") or e.get("zero"):
        continue
    s = e["start"] // 512 // CHUNK * CHUNK
    t = -(-(e["start"] + e["length"]) // 512 // CHUNK) * CHUNK
    theirs.append((s, min(t, end)))
theirs = merge(theirs)

expected_tail = (end, capacity - end) if end < capacity else None
ok = True
if ours != theirs:
    ok = False
    print("%s: allocated blocks differ from qemu-img map (sectors, [start, end))" % name)
    print("  library :", [tuple(r) for r in ours][:20], "..." if len(ours) > 20 else "")
    print("  qemu-img:", [tuple(r) for r in theirs][:20], "..." if len(theirs) > 20 else "")
if tail != expected_tail:
    ok = False
    print("%s: tail %r, expected %r" % (name, tail, expected_tail))
sys.exit(0 if ok else 1)
EOF
}

# Sector-granular expectations: overlay FILE at byte OFFSET onto RAW.
overlay() {
    dd if="$2" of="$1" bs=512 seek="$3" conv=notrunc status=none
}

# A file of N bytes all equal to BYTE (octal escape, e.g. \132).
bytes_file() {
    head -c "$2" /dev/zero | tr '\0' "$3" >"$1"
}

CAP=131072          # 64 MiB in sectors
BYTES=$((CAP * 512))

# nbdkit_check NAME DISK EXPECTED_RAW [words...]: read + blocks, compared
# with the expected raw image and with qemu-img map of the disk.
nbdkit_check() {
    local name=$1 disk=$2 expect=$3
    shift 3
    local single=
    local w
    for w in "$@"; do
        [ "$w" = single ] && single=single
    done
    if ! nbd "$name" "$nbd" "$layout" "$disk" "$work/$name.out.raw" - "$work/$name.blocks" "$@"; then
        return 1
    fi
    if cmp -s "$work/$name.out.raw" "$expect"; then
        pass "$name: ReadAsync of the whole disk equals qemu-img's view"
    else
        fail "$name: data read differs from qemu-img's view ($(cmp "$work/$name.out.raw" "$expect" 2>&1 | head -n 1))"
    fi
    local cap
    cap=$(sed -n 's/^capacity: \([0-9]*\) sectors/\1/p' "$work/log/$name.out")
    qmap "$disk" "$work/$name.map.json" $single
    if compare_blocks "$name" "$work/$name.blocks" "$work/$name.map.json" "$cap" \
        >"$work/log/$name.blocks.cmp" 2>&1; then
        pass "$name: QueryAllocatedBlocks matches qemu-img map ($(grep -c '^block' "$work/$name.blocks") blocks)"
    else
        fail "$name: QueryAllocatedBlocks differs from qemu-img map"
        cat "$work/log/$name.blocks.cmp"
    fi
    rm -f "$work/$name.out.raw"
}

# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------

echo "== fixtures"
mkdir -p "$work/fix"
raw=$work/fix/data.raw
truncate -s $BYTES "$raw"
# Data in places that cover whole grains, partial grains and single sectors.
dd if=/dev/urandom of="$raw" bs=4096 count=256 conv=notrunc status=none              # [0, 1M)
dd if=/dev/urandom of="$raw" bs=4096 seek=1281 count=2 conv=notrunc status=none      # 5M+4K, 8K
dd if=/dev/urandom of="$raw" bs=512 seek=40961 count=1 conv=notrunc status=none      # 20M+512
dd if=/dev/urandom of="$raw" bs=1M seek=32 count=2 conv=notrunc status=none          # [32M, 34M)
dd if=/dev/urandom of="$raw" bs=4096 seek=16383 count=1 conv=notrunc status=none     # last 4K
wraw=$work/fix/write.raw
head -c $((3 * 1048576 + 1000)) /dev/urandom >"$wraw"                               # unaligned size
zero=$work/fix/zero.raw
truncate -s $BYTES "$zero"

# ---------------------------------------------------------------------------
# Every disk type (vdiskmanager -t 0..6)
# ---------------------------------------------------------------------------

for t in 0 1 2 3 4 5 6; do
    echo "== disk type $t (vdiskmanager -t $t)"
    d=$work/t$t
    mkdir -p "$d"

    # An empty disk as vdiskmanager -c makes it.
    if ! "$vdm" -q -c -s 64MB -t $t "$d/empty.vmdk" >"$work/log/t$t-create.err" 2>&1; then
        fail "vdiskmanager -c -t $t failed: $(cat "$work/log/t$t-create.err")"
        continue
    fi
    nbdkit_check "t$t-empty" "$d/empty.vmdk" "$zero" ro

    # A disk with data, converted from the raw fixture.
    if ! "$vdm" convert -f raw -O vmdk -t $t "$raw" "$d/data.vmdk" >"$work/log/t$t-convert.err" 2>&1; then
        fail "vdiskmanager convert -t $t failed: $(cat "$work/log/t$t-convert.err")"
        continue
    fi
    qraw "$d/data.vmdk" "$d/q.raw"
    if ! cmp -s "$d/q.raw" "$raw"; then
        fail "fixture: qemu-img reads t$t/data.vmdk differently from the raw it was made of"
        continue
    fi
    nbdkit_check "t$t-data" "$d/data.vmdk" "$d/q.raw" ro
    if [ $t = 0 ]; then
        # Deviations from VDDK's documented behaviour nbdkit_like noticed.
        sed -n 's/^note: /note: nbdkit_like: /p' "$work/log/t0-data.out"
    fi

    # Sample, read-only commands.
    if ok "t$t-info" "$sample" -info "$d/data.vmdk"; then
        if grep -q "^capacity *= $CAP sectors" "$work/log/t$t-info.out" &&
            grep -q '^number of links *= 1$' "$work/log/t$t-info.out"; then
            pass "t$t: -info"
        else
            fail "t$t: -info output unexpected"
            show "t$t-info"
        fi
    fi
    if ok "t$t-dump" "$sample" -dump -start 10247 -count 20 "$d/data.vmdk"; then
        if xxd -g1 -s $((10247 * 512)) -l $((20 * 512)) "$raw" | cmp -s - "$work/log/t$t-dump.out"; then
            pass "t$t: -dump equals xxd of the data"
        else
            fail "t$t: -dump differs from xxd -g1 of the raw data"
            diff <(xxd -g1 -s $((10247 * 512)) -l $((20 * 512)) "$raw") "$work/log/t$t-dump.out" | head -n 6
        fi
    fi
    for bs in 0 128 1000; do
        if ok "t$t-readbench$bs" "$sample" -readbench $bs "$d/data.vmdk"; then
            line=$(grep '^readbench: ' "$work/log/t$t-readbench$bs.out")
            if [[ $line =~ ^readbench:\ $BYTES\ bytes\ in\ [0-9.]+\ s:\ [0-9.]+\ MiB/s$ ]]; then
                pass "t$t: -readbench $bs: ${line#readbench: }"
            else
                fail "t$t: -readbench $bs printed '$line'"
            fi
        fi
    done
    if [ $t = 0 ]; then
        ok t0-unbuffered "$sample" -unbuffered -readbench 0 "$d/data.vmdk" &&
            pass "t0: -unbuffered -readbench"
    fi
    if ok "t$t-readasyncbench" "$sample" -readasyncbench 256 "$d/data.vmdk"; then
        grep -q "^readasyncbench: $BYTES bytes" "$work/log/t$t-readasyncbench.out" &&
            pass "t$t: -readasyncbench 256" ||
            fail "t$t: -readasyncbench output: $(cat "$work/log/t$t-readasyncbench.out")"
    fi
    if ok "t$t-gab" "$sample" -getallocatedblocks "$d/data.vmdk"; then
        # The same blocks as nbdkit_like's, printed in hex.
        python3 - "$work/log/t$t-gab.out" "$work/t$t-data.blocks" <<'EOF' >"$work/log/t$t-gab.cmp" 2>&1
import sys
def merge(r):
    out = []
    for s, e in sorted(r):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out
sample = []
for line in open(sys.argv[1]):
    f = line.split()
    if len(f) == 2 and f[0].startswith("0x"):
        s, n = int(f[0], 16), int(f[1], 16)
        sample.append((s, s + n))
nbd = []
for line in open(sys.argv[2]):
    f = line.split()
    if f and f[0] in ("block", "tail"):
        nbd.append((int(f[1]), int(f[1]) + int(f[2])))
if merge(sample) != merge(nbd):
    print("sample:", merge(sample)[:10])
    print("nbdkit_like:", merge(nbd)[:10])
    sys.exit(1)
EOF
        if [ $? -eq 0 ]; then
            pass "t$t: -getallocatedblocks agrees with nbdkit_like ($(grep '^allocated' "$work/log/t$t-gab.out"))"
        else
            fail "t$t: -getallocatedblocks differs from nbdkit_like's list"
            cat "$work/log/t$t-gab.cmp"
        fi
    fi
    if ok "t$t-meta" "$sample" -meta "$d/data.vmdk"; then
        if grep -q '^adapterType = lsilogic$' "$work/log/t$t-meta.out"; then
            pass "t$t: -meta lists $(grep -c ' = ' "$work/log/t$t-meta.out") keys"
        else
            fail "t$t: -meta has no 'adapterType = lsilogic'"
            show "t$t-meta"
        fi
    fi
    if ok "t$t-rmeta" "$sample" -rmeta geometry.heads "$d/data.vmdk"; then
        want=$("$vdm" meta get geometry.heads "$d/data.vmdk")
        if grep -qx "geometry.heads = $want" "$work/log/t$t-rmeta.out"; then
            pass "t$t: -rmeta geometry.heads = $want"
        else
            fail "t$t: -rmeta printed '$(cat "$work/log/t$t-rmeta.out")', vdiskmanager says '$want'"
        fi
    fi
    refused "t$t-rmeta-missing" "$sample" -rmeta no.such.key "$d/data.vmdk" &&
        pass "t$t: -rmeta of a missing key fails cleanly"
    refused "t$t-ro-fill" "$sample" -readonly -fill -start 0 -count 1 "$d/data.vmdk" &&
        pass "t$t: -readonly -fill is refused"
    run "t$t-check0" "$sample" -check 0 "$d/data.vmdk"
    case $t in
    0 | 1)
        [ "$rc" -eq 0 ] && pass "t$t: -check 0" || { fail "t$t: -check 0 exit $rc"; show "t$t-check0"; } ;;
    *)
        if [ "$rc" -eq 0 ] || [ "$rc" -eq 1 ]; then
            echo "note: t$t: -check 0 on a non-sparse disk exits $rc"
        else
            fail "t$t: -check 0 exit $rc"
            show "t$t-check0"
        fi ;;
    esac

    if [ $t = 5 ]; then
        # streamOptimized cannot be written in place (as with VMware).
        refused "t5-fill" "$sample" -fill -start 0 -count 1 "$d/data.vmdk" &&
            pass "t5: -fill on streamOptimized fails cleanly"
        run "t5-nbd-write" "$nbd" "$layout" "$d/data.vmdk" - "$wraw" - rw
        if [ "$rc" -eq 1 ]; then
            pass "t5: nbdkit_like write on streamOptimized fails cleanly"
        else
            fail "t5: nbdkit_like write on streamOptimized: exit $rc (expected 1)"
            show t5-nbd-write
        fi
        qraw "$d/data.vmdk" "$d/q2.raw"
        cmp -s "$d/q2.raw" "$raw" || fail "t5: refused writes changed the disk"
        continue
    fi

    # Writes through the sample: -fill, then compare with qemu.
    cp "$raw" "$d/expect.raw"
    bytes_file "$d/fill.bin" 1536 '\132'
    overlay "$d/expect.raw" "$d/fill.bin" 2049
    bytes_file "$d/fill.bin" 512 '\001'
    overlay "$d/expect.raw" "$d/fill.bin" $((CAP - 1))
    if ok "t$t-fill" "$sample" -fill -start 2049 -count 3 -val 0x5a "$d/data.vmdk" &&
        ok "t$t-fill2" "$sample" -fill -start $((CAP - 1)) -count 1 -val 1 "$d/data.vmdk"; then
        if qemu-img compare -q -f raw -F vmdk "$d/expect.raw" "$d/data.vmdk"; then
            pass "t$t: -fill (partial grain, last sector) seen by qemu-img"
        else
            fail "t$t: after -fill qemu-img compare differs"
        fi
        refused "t$t-fill-beyond" "$sample" -fill -start $CAP -count 1 "$d/data.vmdk" &&
            pass "t$t: -fill beyond the end is refused"
    fi

    # Metadata written through the sample.
    if ok "t$t-wmeta" "$sample" -wmeta vdisk.test "hello world" "$d/data.vmdk" &&
        ok "t$t-rmeta2" "$sample" -rmeta vdisk.test "$d/data.vmdk"; then
        if grep -qx 'vdisk.test = hello world' "$work/log/t$t-rmeta2.out" &&
            [ "$("$vdm" meta get vdisk.test "$d/data.vmdk" 2>/dev/null)" = "hello world" ]; then
            pass "t$t: -wmeta/-rmeta round trip (vdiskmanager agrees)"
        else
            fail "t$t: -wmeta/-rmeta: '$(cat "$work/log/t$t-rmeta2.out")'"
        fi
        qemu-img compare -q -f raw -F vmdk "$d/expect.raw" "$d/data.vmdk" ||
            fail "t$t: qemu-img cannot read the disk after -wmeta"
    fi

    # Writes through nbdkit_like: WriteAsync of an unaligned-size raw file,
    # then the whole disk is read back.
    cp "$d/expect.raw" "$d/expect2.raw"
    dd if="$wraw" of="$d/expect2.raw" conv=notrunc status=none
    wlen=$(stat -c %s "$wraw")
    pad=$(((512 - wlen % 512) % 512))
    dd if=/dev/zero of="$d/expect2.raw" bs=1 seek="$wlen" count="$pad" conv=notrunc status=none
    if nbd "t$t-nbd-write" "$nbd" "$layout" "$d/data.vmdk" "$work/t$t-written.raw" "$wraw" \
        "$work/t$t-written.blocks" rw; then
        if qemu-img compare -q -f raw -F vmdk "$d/expect2.raw" "$d/data.vmdk"; then
            pass "t$t: nbdkit_like WriteAsync+Wait+Flush seen by qemu-img compare"
        else
            fail "t$t: after nbdkit_like write qemu-img compare differs"
        fi
        cmp -s "$work/t$t-written.raw" "$d/expect2.raw" &&
            pass "t$t: read back after the write equals what was written" ||
            fail "t$t: read back after the write differs"
        qmap "$d/data.vmdk" "$work/t$t-written.map.json"
        if compare_blocks "t$t-written" "$work/t$t-written.blocks" "$work/t$t-written.map.json" $CAP \
            >"$work/log/t$t-written.cmp" 2>&1; then
            pass "t$t: blocks after the write match qemu-img map"
        else
            fail "t$t: blocks after the write differ from qemu-img map"
            cat "$work/log/t$t-written.cmp"
        fi
        rm -f "$work/t$t-written.raw"
    fi
    case $t in
    0 | 1)
        ok "t$t-check1" "$sample" -check 1 "$d/data.vmdk" && pass "t$t: -check 1"
        qemu-img check -q "$d/data.vmdk" || fail "t$t: qemu-img check fails after the tests" ;;
    esac

    # Benchmarks that write (destroy data): every byte becomes the -val.
    if [ $t = 0 ] || [ $t = 2 ] || [ $t = 6 ]; then
        "$vdm" -q -c -s 64MB -t $t "$d/bench.vmdk"
        bytes_file "$d/bench.raw" $BYTES '\063'
        if ok "t$t-writebench" "$sample" -writebench 128 -val 0x33 "$d/bench.vmdk"; then
            grep -q "^writebench: $BYTES bytes in" "$work/log/t$t-writebench.out" ||
                fail "t$t: -writebench output: $(cat "$work/log/t$t-writebench.out")"
            qemu-img compare -q -f raw -F vmdk "$d/bench.raw" "$d/bench.vmdk" &&
                pass "t$t: -writebench 128 wrote every sector" ||
                fail "t$t: after -writebench qemu-img compare differs"
        fi
        bytes_file "$d/bench.raw" $BYTES '\104'
        if ok "t$t-writeasyncbench" "$sample" -writeasyncbench 300 -val 0x44 "$d/bench.vmdk"; then
            qemu-img compare -q -f raw -F vmdk "$d/bench.raw" "$d/bench.vmdk" &&
                pass "t$t: -writeasyncbench 300 wrote every sector" ||
                fail "t$t: after -writeasyncbench qemu-img compare differs"
        fi
    fi
    rm -f "$d"/*.raw "$d"/*.bin
done

# ---------------------------------------------------------------------------
# -create and -clone through the sample
# ---------------------------------------------------------------------------

echo "== -create / -clone"
c=$work/create
mkdir -p "$c"
for vt in 1 2 3 4 5 6 7; do
    for ad in ide scsi lsilogic; do
        p=$c/c$vt-$ad.vmdk
        if ok "create-$vt-$ad" "$sample" -create -cap 16 -type $vt -adapter $ad "$p"; then
            if ! qemu-img info "$p" >"$work/log/create-$vt-$ad.qinfo" 2>&1 ||
                ! grep -q 'virtual size: 16 MiB' "$work/log/create-$vt-$ad.qinfo"; then
                fail "create -type $vt -adapter $ad: qemu-img info: $(tail -n 3 "$work/log/create-$vt-$ad.qinfo")"
                continue
            fi
            if ok "create-$vt-$ad-info" "$sample" -info "$p"; then
                want=$(case $ad in ide) echo IDE ;; scsi) echo "BusLogic SCSI" ;; *) echo "LsiLogic SCSI" ;; esac)
                if grep -q '^capacity *= 32768 sectors' "$work/log/create-$vt-$ad-info.out" &&
                    grep -q "^adapter type *= $want\$" "$work/log/create-$vt-$ad-info.out"; then
                    pass "create -type $vt -adapter $ad"
                else
                    fail "create -type $vt -adapter $ad: -info says $(grep -E '^(capacity|adapter)' "$work/log/create-$vt-$ad-info.out" | tr '\n' ' ')"
                fi
            fi
        fi
    done
done
refused create-exists "$sample" -create -cap 16 "$c/c1-ide.vmdk" &&
    pass "-create over an existing disk is refused"
run create-vmfs-sparse "$sample" -create -cap 16 -type 8 "$c/c8.vmdk"
echo "note: -create -type 8 (VMFS_SPARSE) exits $rc"

# Clone the data disk of type 0 (after the writes above) into every type.
"$vdm" convert -f raw -O vmdk -t 0 "$raw" "$c/src.vmdk" >/dev/null 2>&1
qraw "$c/src.vmdk" "$c/src.raw"
for vt in 1 2 3 5 7; do
    if ok "clone-$vt" "$sample" -clone "$c/src.vmdk" -type $vt "$c/clone$vt.vmdk"; then
        qemu-img compare -q -f raw -F vmdk "$c/src.raw" "$c/clone$vt.vmdk" &&
            pass "-clone to type $vt: qemu-img compare equal" ||
            fail "-clone to type $vt: qemu-img compare differs"
    fi
done
# Overwrite TRUE: cloning again onto an existing destination works.
if ok clone-again "$sample" -clone "$c/src.vmdk" -type 1 "$c/clone1.vmdk"; then
    qemu-img compare -q -f raw -F vmdk "$c/src.raw" "$c/clone1.vmdk" &&
        pass "-clone over an existing disk (overWrite TRUE)" ||
        fail "-clone over an existing disk: content differs"
fi
run clone-connectex "$sample" -connectex -clone "$c/src.vmdk" "$c/clone-ex.vmdk"
[ "$rc" -eq 0 ] && pass "-connectex (AllocateConnectParams + ConnectEx) -clone" ||
    { fail "-connectex -clone exit $rc"; show clone-connectex; }
run init-info "$sample" -init -info "$c/src.vmdk"
[ "$rc" -eq 0 ] && pass "deprecated VixDiskLib_Init" || { fail "-init -info exit $rc"; show init-info; }
run mode-info "$sample" -mode file -info "$c/src.vmdk"
[ "$rc" -eq 0 ] && pass "ConnectEx with transport modes \"file\"" || { fail "-mode file -info exit $rc"; show mode-info; }
refused missing-open "$sample" -info "$c/does-not-exist.vmdk" &&
    grep -q 'VixError 4)' "$work/log/missing-open.err" &&
    pass "-info of a missing file: VIX_E_FILE_NOT_FOUND with error text" ||
    { fail "-info of a missing file: $(cat "$work/log/missing-open.err")"; }
rm -f "$c"/*.raw

# ---------------------------------------------------------------------------
# Chains
# ---------------------------------------------------------------------------

echo "== chains"
ch=$work/chain
mkdir -p "$ch"
(
    cd "$ch" &&
        qemu-img create -q -f vmdk base.vmdk 64M &&
        qemu-io -f vmdk -c 'write -q -P 0x11 0 1M' -c 'write -q -P 0x22 8M 64k' \
            -c 'write -q -P 0x23 9M 1536' base.vmdk &&
        qemu-img create -q -f vmdk -b base.vmdk -F vmdk child.vmdk &&
        qemu-io -f vmdk -c 'write -q -P 0x33 512k 1M' -c 'write -q -P 0x34 9M 512' child.vmdk
) >"$work/log/chain-fixture.err" 2>&1 || fail "chain fixture: $(cat "$work/log/chain-fixture.err")"
qraw "$ch/child.vmdk" "$ch/child.raw"
qraw "$ch/child.vmdk" "$ch/single.raw" single
qraw "$ch/base.vmdk" "$ch/base.raw"
nbdkit_check chain "$ch/child.vmdk" "$ch/child.raw" ro
grep -q '^numLinks: 2$' "$work/log/chain.out" && pass "chain: numLinks 2" ||
    fail "chain: $(grep numLinks "$work/log/chain.out")"
grep -q '^parentFileNameHint: .*base.vmdk$' "$work/log/chain.out" &&
    pass "chain: parentFileNameHint" || fail "chain: $(grep parentFileNameHint "$work/log/chain.out")"
nbdkit_check chain-single "$ch/child.vmdk" "$ch/single.raw" ro single
if ok chain-info "$sample" -info "$ch/child.vmdk"; then
    grep -q '^number of links *= 2$' "$work/log/chain-info.out" && pass "chain: -info number of links = 2" ||
        fail "chain: -info: $(grep links "$work/log/chain-info.out")"
fi

# -single: the child alone; sector 16384 (8 MiB) has data only in the parent.
if ok chain-dump "$sample" -dump -start 16384 -count 2 "$ch/child.vmdk" &&
    ok chain-single-dump "$sample" -single -dump -start 16384 -count 2 "$ch/child.vmdk"; then
    xxd -g1 -s $((16384 * 512)) -l 1024 "$ch/child.raw" | cmp -s - "$work/log/chain-dump.out" &&
        xxd -g1 -s $((16384 * 512)) -l 1024 "$ch/single.raw" | cmp -s - "$work/log/chain-single-dump.out" &&
        pass "chain: -dump reads the parent's data, -single -dump does not" ||
        fail "chain: -dump / -single -dump differ from qemu-img's views"
fi

# -redo: a child made by the library on a qemu-made chain (3 links), written.
if ok chain-redo "$sample" -redo "$ch/child.vmdk" "$ch/grandchild.vmdk"; then
    if qemu-img compare -q -f raw -F vmdk "$ch/child.raw" "$ch/grandchild.vmdk"; then
        pass "-redo: the new child reads as its parent (qemu-img)"
    else
        fail "-redo: the new child reads differently from its parent"
    fi
    cp "$ch/child.raw" "$ch/gc.raw"
    bytes_file "$ch/fill.bin" 512 '\167'
    overlay "$ch/gc.raw" "$ch/fill.bin" 18432
    if ok chain-redo-fill "$sample" -fill -start 18432 -count 1 -val 0x77 "$ch/grandchild.vmdk"; then
        qemu-img compare -q -f raw -F vmdk "$ch/gc.raw" "$ch/grandchild.vmdk" &&
            pass "-redo child written: qemu-img sees parent data plus the write" ||
            fail "-redo child written: qemu-img compare differs"
        qemu-img compare -q -f raw -F vmdk "$ch/child.raw" "$ch/child.vmdk" &&
            qemu-img compare -q -f raw -F vmdk "$ch/base.raw" "$ch/base.vmdk" &&
            pass "-redo child written: parents unchanged" ||
            fail "-redo child written: a parent changed"
    fi
    nbdkit_check chain3 "$ch/grandchild.vmdk" "$ch/gc.raw" ro
    grep -q '^numLinks: 3$' "$work/log/chain3.out" && pass "chain3: numLinks 3" ||
        fail "chain3: $(grep numLinks "$work/log/chain3.out")"
    # nbdkit_like writes into the top of the chain.
    cp "$ch/gc.raw" "$ch/gc2.raw"
    dd if="$wraw" of="$ch/gc2.raw" conv=notrunc status=none
    dd if=/dev/zero of="$ch/gc2.raw" bs=1 seek="$wlen" count="$pad" conv=notrunc status=none
    if nbd chain3-write "$nbd" "$layout" "$ch/grandchild.vmdk" "$work/chain3-w.raw" "$wraw" - rw; then
        qemu-img compare -q -f raw -F vmdk "$ch/gc2.raw" "$ch/grandchild.vmdk" &&
            cmp -s "$work/chain3-w.raw" "$ch/gc2.raw" &&
            qemu-img compare -q -f raw -F vmdk "$ch/child.raw" "$ch/child.vmdk" &&
            pass "chain3: nbdkit_like write into the top link (parents unchanged)" ||
            fail "chain3: nbdkit_like write into the top link: content differs"
    fi
    rm -f "$work/chain3-w.raw"
fi
# -redo on a vdiskmanager base.
"$vdm" convert -f raw -O vmdk -t 0 "$raw" "$ch/vbase.vmdk" >/dev/null 2>&1
if ok chain-redo2 "$sample" -redo "$ch/vbase.vmdk" "$ch/vchild.vmdk"; then
    qemu-img compare -q -f raw -F vmdk "$raw" "$ch/vchild.vmdk" &&
        pass "-redo on a vdiskmanager base" || fail "-redo on a vdiskmanager base: content differs"
fi
rm -f "$ch"/*.raw

# ---------------------------------------------------------------------------
# Odd sizes: unaligned tail, more than one QueryAllocatedBlocks call
# ---------------------------------------------------------------------------

echo "== odd sizes"
o=$work/odd
mkdir -p "$o"
# nbdkit's test-vddk-real-unaligned-chunk: 4*128+3 sectors, first 3 chunks data.
"$vdm" -q -c -s 515 -t 0 "$o/u.vmdk"
qemu-io -f vmdk -c 'write -q -P 0x5c 0 196608' "$o/u.vmdk" >/dev/null
qraw "$o/u.vmdk" "$o/u.raw"
nbdkit_check unaligned "$o/u.vmdk" "$o/u.raw" ro
if grep -qx 'tail 512 3' "$work/unaligned.blocks" && grep -qx 'block 0 384' "$work/unaligned.blocks"; then
    pass "unaligned: blocks [0,384) + tail [512,515)"
else
    fail "unaligned: blocks: $(tr '\n' ' ' <"$work/unaligned.blocks")"
fi
if ok unaligned-gab "$sample" -getallocatedblocks "$o/u.vmdk"; then
    grep -q '^allocated: 387 of 515 sectors' "$work/log/unaligned-gab.out" &&
        pass "unaligned: -getallocatedblocks counts the tail" ||
        fail "unaligned: -getallocatedblocks: $(grep allocated "$work/log/unaligned-gab.out")"
fi
# Writing a file larger than the disk writes the first 515 sectors.
head -c $((515 * 512)) "$wraw" >"$o/u-expect.raw"
if nbd unaligned-write "$nbd" "$layout" "$o/u.vmdk" "$work/u-w.raw" "$wraw" - rw; then
    qemu-img compare -q -f raw -F vmdk "$o/u-expect.raw" "$o/u.vmdk" &&
        cmp -s "$work/u-w.raw" "$o/u-expect.raw" &&
        pass "unaligned: write up to the last sector" ||
        fail "unaligned: write up to the last sector: content differs"
fi
rm -f "$work/u-w.raw"

# 40 GiB: more than VIXDISKLIB_MAX_CHUNK_NUMBER chunks of 128 sectors.
"$vdm" -q -c -s 40GB -t 0 "$o/big.vmdk"
qemu-io -f vmdk -c 'write -q -P 0x44 0 64k' -c 'write -q -P 0x55 33G 1M' \
    -c "write -q -P 0x66 $((40 * 1024 * 1024 * 1024 - 65536)) 64k" "$o/big.vmdk" >/dev/null
if nbd big "$nbd" "$layout" "$o/big.vmdk" - - "$work/big.blocks" ro noread; then
    qmap "$o/big.vmdk" "$work/big.map.json"
    if compare_blocks big "$work/big.blocks" "$work/big.map.json" $((40 * 2097152)) \
        >"$work/log/big.cmp" 2>&1; then
        pass "40 GiB: QueryAllocatedBlocks in 32 GiB calls matches qemu-img map"
    else
        fail "40 GiB: QueryAllocatedBlocks differs from qemu-img map"
        cat "$work/log/big.cmp"
    fi
fi
if ok big-gab "$sample" -getallocatedblocks -chunksize 2048 "$o/big.vmdk"; then
    grep -q '^allocated: 6144 of 83886080 sectors' "$work/log/big-gab.out" &&
        pass "40 GiB: -getallocatedblocks -chunksize 2048" ||
        fail "40 GiB: -getallocatedblocks -chunksize 2048: $(grep allocated "$work/log/big-gab.out")"
fi

# The backup flow through the C ABI: change tracking (VdiskExt_*), CreateChild
# snapshots, QueryAllocatedBlocks full and VdiskExt_QueryChangedAreas incremental
# backups, consolidation, restore verified sector by sector; the backups and the
# restored disk are then checked with qemu-img.
if gcc "${CFLAGS[@]}" "$root/examples/c/backupFlow.c" -o "$work/bin/backupFlow" "${LINK[@]}" \
    >"$work/log/backupFlow.build" 2>&1; then
    pass "examples/c/backupFlow.c builds with -Wall -Wextra -Werror"
    mkdir -p "$work/flow"
    if ok backup-flow "$work/bin/backupFlow" "$work/flow"; then
        if grep -q '^Backup flow verified.$' "$work/log/backup-flow.out" &&
            grep -q 'changed since the last backup' "$work/log/backup-flow.out"; then
            pass "backup flow: full + incremental backups restore byte-identical (C ABI)"
        else
            fail "backup flow: no verified restore in its output"
        fi
        qemu-img check -q "$work/flow/backup-2.vmdk" &&
            qemu-img compare -q "$work/flow/backup-2.vmdk" "$work/flow/restored-incremental.vmdk" &&
            pass "backup flow: qemu-img reads the incremental backup chain as the restored disk" ||
            fail "backup flow: qemu-img disagrees with the incremental backup chain"
    fi
else
    fail "examples/c/backupFlow.c does not build"
    cat "$work/log/backupFlow.build"
fi

# The same checks over the network: nbd and nbdssl.
# shellcheck source=tests/c/remote.sh
. "$here/remote.sh"

# libvixMntapi: header, layout, refusals, and (as root) mounts through its sample.
# shellcheck source=tests/c/mntapi.sh
. "$here/mntapi.sh"

finish
