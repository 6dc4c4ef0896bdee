# tests/c/mntapi.sh - the C ABI tests of libvixMntapi; sourced by tests/c/run.sh
# (it uses run.sh's variables and helpers: $layout, $inc, $lib, $work, $vdm, VG,
# ok, refused, run, pass, fail, show).
#
# Without root: the header, the library file, mntapi_layout.c (sizes, offsets,
# constants, prototypes), mntapi_errors.c (every refusal that comes before a mount,
# under valgrind) and the sample's NO_ROOT answer. As root, vixMntapiSample mounts
# volumes of disks made with sfdisk + mkfs.ext4 -d + vdiskmanager convert (MBR with
# a swap partition, GPT with two ext4 partitions): files read through symbolicLink
# equal the originals, the disks' sha256 do not change with read-only mounts, a
# read-write mount's file is in the disk afterwards (qemu-img convert + debugfs,
# and a new read-only mount), GetOsInfo finds the os-release, a busy volume is
# refused then forced, and nothing stays mounted (no fuse.vdisk mount, no loop
# device on a vdisk-mount file, no folder left).

echo "== libvixMntapi"
PATH=$PATH:/usr/sbin:/sbin
if [ ${#VG[@]} -ne 0 ]; then
    # The sample serves its own FUSE mount: valgrind must not hold its lock
    # across system calls that wait for that mount.
    VG+=(--sim-hints=fuse-compatible)
fi
m=$work/mntapi
mkdir -p "$m"
LINKM=(-L "$lib" -Wl,-rpath,"$lib" -lvixMntapi -lvixDiskLib -pthread)

if [ ! -f "$inc/vixMntapi.h" ]; then
    fail "$inc/vixMntapi.h is missing"
    return 0
fi
if gcc -std=c99 -pedantic -Wall -Wextra -Werror -fsyntax-only -I "$inc" -x c "$inc/vixMntapi.h" \
    >"$work/log/mheader-c.err" 2>&1; then
    pass "vixMntapi.h compiles as C99 (-pedantic -Wall -Wextra -Werror)"
else
    fail "vixMntapi.h does not compile as C99"
    cat "$work/log/mheader-c.err"
fi
if g++ -x c++ -fsyntax-only -Wall -Wextra -Werror -I "$inc" "$inc/vixMntapi.h" \
    >"$work/log/mheader-cxx.err" 2>&1; then
    pass "vixMntapi.h compiles as C++"
else
    fail "vixMntapi.h does not compile as C++"
    cat "$work/log/mheader-cxx.err"
fi

mso=$lib/libvixMntapi.so.1
if [ -e "$mso" ] && [ -e "$lib/libvixMntapi.so" ]; then
    soname=$(readelf -d "$mso" | sed -n 's/.*Library soname: \[\(.*\)\].*/\1/p')
    [ "$soname" = libvixMntapi.so.1 ] && pass "SONAME of $mso is libvixMntapi.so.1" ||
        fail "SONAME of $mso is '$soname', expected libvixMntapi.so.1"
    exported=$(nm -D --defined-only "$mso" | awk '$2 == "T" || $2 == "W" {print $3}' | sort)
    expected=$(printf 'VixMntapi_%s\n' CloseDiskSet DismountVolume Exit FreeDiskSetInfo \
        FreeOsInfo FreeVolumeHandles FreeVolumeInfo GetDiskSetInfo GetOsInfo \
        GetVolumeHandles GetVolumeInfo Init MountVolume OpenDiskSet OpenDisks | sort)
    if [ "$exported" = "$expected" ]; then
        pass "libvixMntapi exports the 15 VixMntapi_ functions and nothing else"
    else
        fail "libvixMntapi exports: $(echo $exported)"
    fi
else
    fail "$mso or $lib/libvixMntapi.so does not exist (vdisk-ffi/install.sh)"
    return 0
fi

for prog in mntapi_layout mntapi_errors; do
    if gcc "${CFLAGS[@]}" "$here/$prog.c" -o "$work/bin/$prog" "${LINKM[@]}" \
        >"$work/log/build-$prog.err" 2>&1; then
        pass "$prog builds"
    else
        fail "$prog does not build"
        head -n 40 "$work/log/build-$prog.err"
    fi
done
msample=$work/bin/vixMntapiSample
if gcc "${CFLAGS[@]}" "$root/examples/c/vixMntapiSample.c" -o "$msample" "${LINKM[@]}" \
    >"$work/log/build-msample.err" 2>&1; then
    pass "vixMntapiSample builds"
else
    fail "vixMntapiSample does not build"
    head -n 40 "$work/log/build-msample.err"
fi
if [ -x "$work/bin/mntapi_layout" ] && ok mntapi_layout "$work/bin/mntapi_layout" &&
    grep -q '^mntapi layout OK' "$work/log/mntapi_layout.out"; then
    pass "$(cat "$work/log/mntapi_layout.out")"
elif [ -x "$work/bin/mntapi_layout" ]; then
    grep MISMATCH "$work/log/mntapi_layout.out"
    fail "mntapi_layout reported mismatches"
fi

# ---------------------------------------------------------------------------
# Fixtures: an MBR disk (p1 ext4 with files and etc/os-release, p2 swap) and a
# GPT disk (p1 ext4 with the same files but no etc, p2 ext4 with etc/os-release).
# ---------------------------------------------------------------------------

missing=()
for tool in sfdisk mkfs.ext4 mkswap debugfs e2fsck sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -ne 0 ]; then
    fail "libvixMntapi disk tests need ${missing[*]} (fdisk, e2fsprogs, util-linux)"
    return 0
fi
mkdir -p "$m/files" "$m/os/etc"
printf 'NAME="vdisk Test Linux"\nID=vdtest\nVERSION_ID="3.14"\nPRETTY_NAME="vdisk Test Linux 3.14"\n' \
    >"$m/os/etc/os-release"
echo "hello from the guest" >"$m/files/hello.txt"
head -c 3000000 /dev/urandom >"$m/files/data.bin"
head -c 400000 /dev/urandom >"$m/new.bin"
cp -r "$m/files" "$m/mbr-p1"
cp -r "$m/os/etc" "$m/mbr-p1/etc"
if ! {
    mkfs.ext4 -q -F -L data -d "$m/mbr-p1" "$m/p1.img" 24M &&
        mkfs.ext4 -q -F -L data -d "$m/files" "$m/gp1.img" 24M &&
        mkfs.ext4 -q -F -L system -d "$m/os" "$m/p2.img" 8M &&
        truncate -s 8M "$m/swap.img" && mkswap -q "$m/swap.img" &&
        truncate -s 64M "$m/mbr.raw" "$m/gpt.raw" &&
        printf 'label: dos\nstart=2048, size=49152, type=83\nstart=51200, size=16384, type=82\n' |
        sfdisk -q "$m/mbr.raw" &&
        printf 'label: gpt\nstart=2048, size=49152, type=%s\nstart=51200, size=16384, type=%s\n' \
            0FC63DAF-8483-4772-8E79-3D69D8477DE4 0FC63DAF-8483-4772-8E79-3D69D8477DE4 |
        sfdisk -q "$m/gpt.raw" &&
        dd if="$m/p1.img" of="$m/mbr.raw" bs=512 seek=2048 conv=notrunc status=none &&
        dd if="$m/swap.img" of="$m/mbr.raw" bs=512 seek=51200 conv=notrunc status=none &&
        dd if="$m/gp1.img" of="$m/gpt.raw" bs=512 seek=2048 conv=notrunc status=none &&
        dd if="$m/p2.img" of="$m/gpt.raw" bs=512 seek=51200 conv=notrunc status=none &&
        "$vdm" convert -q -f raw -O vmdk -t 0 "$m/mbr.raw" "$m/mbr.vmdk" &&
        "$vdm" convert -q -f raw -O vmdk -t 0 "$m/gpt.raw" "$m/gpt.vmdk"
} >"$work/log/mntapi-fixture.err" 2>&1; then
    fail "libvixMntapi fixtures: $(tail -n 5 "$work/log/mntapi-fixture.err")"
    return 0
fi
rm -f "$m"/*.raw "$m"/*.img

if [ -x "$work/bin/mntapi_errors" ]; then
    if ok mntapi_errors "$work/bin/mntapi_errors" "$m/mbr.vmdk" "$m/gpt.vmdk"; then
        pass "$(tail -n 1 "$work/log/mntapi_errors.out") (refusals, bad and stale handles, numberOfDisks 0 and 2)"
    else
        grep FAILED "$work/log/mntapi_errors.out"
    fi
fi
[ -x "$msample" ] || return 0

if [ "$(id -u)" != 0 ]; then
    refused mntapi-noroot "$msample" -q "$m/mbr.vmdk" &&
        grep -q 'VixError 24017' "$work/log/mntapi-noroot.out" &&
        pass "vixMntapiSample without root: VIX_E_MNTAPI_NO_ROOT" ||
        fail "vixMntapiSample without root: $(grep 'cannot mount' "$work/log/mntapi-noroot.out")"
    echo "note: not root: the libvixMntapi mount tests are skipped"
    return 0
fi

# ---------------------------------------------------------------------------
# Mounts (root)
# ---------------------------------------------------------------------------

# nothing_left NAME: nothing of these tests stays mounted: no fuse.vdisk mount of
# a disk in $m, no mount on a vixmntapi folder, no loop device on the FUSE folder
# of such a mount (its record names the disk), no mount folder left. (Other
# vdisk-mount users on the machine are left out of the count.)
nothing_left() {
    local left="" dev backing info
    grep ' fuse.vdisk ' /proc/self/mountinfo | grep -qF " $m/" && left="$left fuse.vdisk-mounts"
    awk '{print $5}' /proc/self/mountinfo | grep -q '/vixmntapi-' && left="$left volume-mounts"
    while read -r dev backing; do
        info=$(sed -n 's|^(\(/run/vdisk-mount/vol-[0-9]*-[0-9]*\)/.*|\1.info|p' <<<"$backing")
        if [ -n "$info" ] && grep -qF "disk=$m/" "$info" 2>/dev/null; then
            left="$left loop-device:$dev"
        fi
    done < <(losetup -a 2>/dev/null | sed -n 's|^\(/dev/loop[0-9]*\):.*\((.*)\)$|\1 \2|p')
    ls -d /run/vdisk-mount/vixmntapi-* "$m"/tmpdir/vixmntapi-* >/dev/null 2>&1 &&
        left="$left mount-folders"
    if [ -z "$left" ]; then
        pass "$1: nothing left mounted (no fuse.vdisk, no loop device, no folder)"
    else
        fail "$1: left behind:$left"
        grep ' fuse.vdisk ' /proc/self/mountinfo
        losetup -a
    fi
}

# same NAME FILE EXPECTED: cmp with a pass/fail line.
same() {
    if cmp -s "$2" "$3"; then
        pass "$1"
    else
        fail "$1 ($(cmp "$2" "$3" 2>&1 | head -n 1))"
    fi
}

sha_mbr=$(sha256sum <"$m/mbr.vmdk")
sha_gpt=$(sha256sum <"$m/gpt.vmdk")

# Read-only mount of the MBR disk: volume 1 ext4, volume 2 swap (refused).
if ok mntapi-ro "$msample" -q -copyout hello.txt "$m/hello.out" -copyout data.bin "$m/data.out" \
    "$m/mbr.vmdk"; then
    o=$work/log/mntapi-ro.out
    same "MountVolume read-only: hello.txt read through symbolicLink" "$m/hello.out" "$m/files/hello.txt"
    same "MountVolume read-only: data.bin (3 MB) read through symbolicLink" "$m/data.out" "$m/files/data.bin"
    link=$(sed -n 's/^volume 1: type=BASIC_PARTITION isMounted=1 symbolicLink=\([^ ]*\) numGuestMountPoints=0$/\1/p' "$o")
    grep -q '^disk set: openFlags=4 mountPath=/run/vdisk-mount/vixmntapi-' "$o" &&
        grep -q '^volumes: 2$' "$o" && [ -n "$link" ] &&
        grep -q '^volume 1: entries: data.bin etc hello.txt lost+found$' "$o" &&
        grep -q '^volume 2: cannot mount: .*(VixError 6)$' "$o" &&
        pass "MBR: 2 basic volumes, volume 1 mounted at $link, the swap volume refused" ||
        { fail "MBR read-only mount: unexpected output"; show mntapi-ro; }
    grep -qx "os: family=OTHER(255) version=3.14 64bit=0 vendor=\"vdisk Test Linux\" edition=\"vdisk Test Linux 3.14\" osFolder=$link" "$o" &&
        pass "GetOsInfo: os-release of the mounted volume" ||
        fail "GetOsInfo: $(grep '^os:' "$o")"
    grep -q '^volume 1: dismounted$' "$o" && ! grep -q 'isMounted=1' <(sed -n '/dismounted/,$p' "$o") &&
        pass "DismountVolume: GetVolumeInfo says not mounted afterwards" ||
        fail "DismountVolume: $(grep '^volume 1' "$o" | tail -n 2)"
fi
[ "$(sha256sum <"$m/mbr.vmdk")" = "$sha_mbr" ] &&
    pass "read-only mounts leave the MBR disk's sha256 unchanged" ||
    fail "a read-only mount changed the MBR disk"
nothing_left "after the read-only mount"

# Refusals of the sample's own sequence: the swap volume alone, two disks.
refused mntapi-swap "$msample" -q -volume 2 "$m/mbr.vmdk" &&
    grep -q 'VixMntapi_MountVolume failed.*(VixError 6)' "$work/log/mntapi-swap.err" &&
    pass "MountVolume of a swap partition: VIX_E_NOT_SUPPORTED" ||
    fail "MountVolume of a swap partition: $(tail -n 1 "$work/log/mntapi-swap.err")"
refused mntapi-2disks "$msample" -q -disks 2 "$m/mbr.vmdk" &&
    grep -q 'VixMntapi_OpenDisks.*(VixError 6)' "$work/log/mntapi-2disks.err" &&
    pass "OpenDisks with numberOfDisks 2: VIX_E_NOT_SUPPORTED" ||
    fail "OpenDisks with numberOfDisks 2: $(tail -n 1 "$work/log/mntapi-2disks.err")"

# GPT: volume 1 only; GetOsInfo mounts volume 2 to find the system and leaves it
# mounted; CloseDiskSet dismounts it.
if ok mntapi-gpt "$msample" -q -volume 1 -copyout data.bin "$m/gdata.out" "$m/gpt.vmdk"; then
    o=$work/log/mntapi-gpt.out
    same "GPT: data.bin read through symbolicLink" "$m/gdata.out" "$m/files/data.bin"
    grep -q '^volumes: 2$' "$o" && grep -q '^volume 1: type=GPT_PARTITION isMounted=1' "$o" &&
        pass "GPT: 2 volumes of type GPT_PARTITION" || { fail "GPT: unexpected output"; show mntapi-gpt; }
    grep -q '^os: family=OTHER(255) version=3.14 .*osFolder=/run/vdisk-mount/vixmntapi-[0-9-]*/p2$' "$o" &&
        grep -q '^volume 2: left mounted by GetOsInfo (CloseDiskSet dismounts it)$' "$o" &&
        pass "GetOsInfo mounts the volume holding the system (volume 2) and leaves it mounted" ||
        fail "GetOsInfo on GPT: $(grep -E '^(os|volume 2)' "$o" | tr '\n' ' ')"
fi
[ "$(sha256sum <"$m/gpt.vmdk")" = "$sha_gpt" ] &&
    pass "read-only mounts leave the GPT disk's sha256 unchanged" ||
    fail "a read-only mount changed the GPT disk"
nothing_left "after CloseDiskSet with a volume still mounted"

# OpenDiskSet from a read-only VixDiskLib handle; a busy volume; tmpDirectory.
if ok mntapi-diskset "$msample" -q -opendiskset -noosinfo -copyout hello.txt "$m/hello2.out" \
    "$m/mbr.vmdk"; then
    same "OpenDiskSet (read-only VixDiskLib handle): hello.txt" "$m/hello2.out" "$m/files/hello.txt"
fi
if ok mntapi-busy "$msample" -q -busy -volume 1 -noosinfo "$m/mbr.vmdk"; then
    grep -q '^volume 1: busy: .*(VixError 24015)$' "$work/log/mntapi-busy.out" &&
        grep -q '^volume 1: dismounted (forced)$' "$work/log/mntapi-busy.out" &&
        pass "DismountVolume of a busy volume: VIX_E_MNTAPI_OPEN_HANDLES, then forced" ||
        fail "busy dismount: $(grep '^volume 1' "$work/log/mntapi-busy.out" | tr '\n' ' ')"
fi
nothing_left "after a forced dismount"
mkdir -p "$m/tmpdir"
printf '# VDDK configuration\ntmpDirectory = "%s"\nvixMntapi.cfg.LogLevel = 3\n' "$m/tmpdir" >"$m/vddk.cfg"
if ok mntapi-tmpdir "$msample" -initex "$m/vddk.cfg" -noosinfo -volume 1 "$m/mbr.vmdk"; then
    grep -q "^disk set: openFlags=4 mountPath=$m/tmpdir/vixmntapi-" "$work/log/mntapi-tmpdir.out" &&
        grep -q "symbolicLink=$m/tmpdir/vixmntapi-[0-9-]*/p1 " "$work/log/mntapi-tmpdir.out" &&
        [ -z "$(ls -A "$m/tmpdir")" ] &&
        pass "tmpDirectory of the configuration file holds the mount folders (removed afterwards)" ||
        fail "tmpDirectory: $(grep -E '^(disk set|volume 1: type)' "$work/log/mntapi-tmpdir.out" | tr '\n' ' ') left: $(ls -A "$m/tmpdir")"
    grep -q '^Log: VixMntapi: mounted volume p1' "$work/log/mntapi-tmpdir.err" &&
        pass "log lines reach the log callback" || fail "no VixMntapi log line in the log callback"
fi

# Read-write: a file copied in is in the disk after dismount.
if ok mntapi-rw "$msample" -q -rw -noosinfo -volume 1 -copyin "$m/new.bin" written.bin "$m/mbr.vmdk"; then
    grep -q '^disk set: openFlags=0 ' "$work/log/mntapi-rw.out" &&
        grep -q '^volume 1: mounted (read-write)$' "$work/log/mntapi-rw.out" ||
        fail "read-write mount: $(head -n 4 "$work/log/mntapi-rw.out" | tr '\n' ' ')"
    if qemu-img convert -O raw "$m/mbr.vmdk" "$m/back.raw" &&
        dd if="$m/back.raw" of="$m/back-p1.img" bs=512 skip=2048 count=49152 status=none &&
        debugfs -R "dump /written.bin $m/written.debugfs" "$m/back-p1.img" >/dev/null 2>&1; then
        same "read-write mount: the file written is in the disk (qemu-img convert + debugfs)" \
            "$m/written.debugfs" "$m/new.bin"
        e2fsck -fn "$m/back-p1.img" >"$work/log/mntapi-e2fsck.out" 2>&1 &&
            pass "read-write mount: e2fsck -fn finds the file system clean" ||
            fail "read-write mount: e2fsck: $(tail -n 3 "$work/log/mntapi-e2fsck.out")"
    else
        fail "read-write mount: cannot read written.bin back with qemu-img + debugfs"
    fi
    rm -f "$m/back.raw" "$m/back-p1.img"
    if ok mntapi-reopen "$msample" -q -noosinfo -volume 1 -copyout written.bin "$m/written.again" \
        "$m/mbr.vmdk"; then
        same "read-write mount: the file is there after dismount and reopen" "$m/written.again" "$m/new.bin"
    fi
    [ "$(sha256sum <"$m/mbr.vmdk")" != "$sha_mbr" ] ||
        fail "read-write mount: the disk did not change"
fi
nothing_left "at the end of the libvixMntapi tests"
