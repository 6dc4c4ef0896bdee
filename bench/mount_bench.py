#!/usr/bin/env python3
"""Side-by-side mount benchmark: sequential read of a whole disk through a FUSE mount,
`vdisk-mount -r -f` (file `flat`) against libvmdk's `vmdkmount` (file `vmdk1`).

For the 2 GiB random and text images of ../shared/bench/gen.py converted to
monolithicSparse and streamOptimized (made with vdiskmanager in target/bench), each
tool mounts the disk, and `dd bs=1M` reads the whole disk image file; the page cache
is dropped before every timed read (so both read through their FUSE servers), runs
are interleaved, and the median times and their ratio (vmdkmount time / ours) are
printed, with the physical limit: the image file itself read by `dd`, cold, in the
same rounds. Needs root (FUSE, drop_caches).

usage: mount_bench.py [--rounds N] [--kinds random,text] [--formats monolithicSparse,streamOptimized] [--verbose]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GEN = os.path.join(ROOT, "..", "shared", "bench", "gen.py")


def drop_caches():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def timed_read(path):
    drop_caches()
    t0 = time.monotonic()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t0


def wait_for(path, timeout=10.0):
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > end:
            sys.exit(f"{path} did not appear")
        time.sleep(0.05)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kinds", default="random,text")
    ap.add_argument("--formats", default="monolithicSparse,streamOptimized")
    ap.add_argument("--verbose", action="store_true", help="print every timing")
    ap.add_argument("--ab", action="store_true",
                    help="also time ours without read-ahead (VDISK_MOUNT_NO_PREFETCH)")
    a = ap.parse_args()
    work = os.path.join(ROOT, "target", "bench")
    os.makedirs(work, exist_ok=True)
    vdm = os.path.join(ROOT, "target", "release", "vdiskmanager")
    vmount = os.path.join(ROOT, "target", "release", "vdisk-mount")
    print(f"{'case':32} {'ours s':>8} {'vmdkmount s':>12} {'ratio':>7}")
    for kind in a.kinds.split(","):
        raw = os.path.join(work, f"{kind}-2048.raw")
        if not os.path.exists(raw):
            subprocess.run([sys.executable, GEN, raw, "2048", kind], check=True)
        for name, t in (("monolithicSparse", "0"), ("streamOptimized", "5")):
            if name not in a.formats.split(","):
                continue
            disk = os.path.join(work, f"mb-{kind}-{name}.vmdk")
            if not os.path.exists(disk):
                subprocess.run([vdm, "convert", "-q", "-f", "raw", "-t", t, raw, disk], check=True)
            with tempfile.TemporaryDirectory() as ours_dir, tempfile.TemporaryDirectory() as theirs_dir, \
                    tempfile.TemporaryDirectory() as plain_dir:
                subprocess.run([vmount, "-r", "-f", disk, ours_dir], check=True)
                if a.ab:
                    env = dict(os.environ, VDISK_MOUNT_NO_PREFETCH="1")
                    subprocess.run([vmount, "-r", "-f", disk, plain_dir], check=True, env=env)
                # vmdkmount daemonizes once the mount is up.
                subprocess.run(["vmdkmount", disk, theirs_dir], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    wait_for(os.path.join(theirs_dir, "vmdk1"))
                    ours_f, theirs_f = os.path.join(ours_dir, "flat"), os.path.join(theirs_dir, "vmdk1")
                    timed_read(ours_f)
                    timed_read(theirs_f)
                    plain_f = os.path.join(plain_dir, "flat")
                    to, tt, tp, tf = [], [], [], []
                    for _ in range(a.rounds):
                        to.append(timed_read(ours_f))
                        tt.append(timed_read(theirs_f))
                        # The physical limit: the image file itself, read cold with
                        # no FUSE and no format in between.
                        tf.append(timed_read(disk))
                        if a.ab:
                            tp.append(timed_read(plain_f))
                finally:
                    subprocess.run([vmount, "-d", ours_dir])
                    if a.ab:
                        subprocess.run([vmount, "-d", plain_dir])
                    subprocess.run(["fusermount3", "-u", theirs_dir])
            if a.verbose:
                print("  ours:", " ".join(f"{x:.2f}" for x in to), " vmdkmount:", " ".join(f"{x:.2f}" for x in tt),
                      " image file:", " ".join(f"{x:.2f}" for x in tf))
            mf = statistics.median(tf)
            size_mib = os.path.getsize(disk) / 2**20
            print(f"  limit: dd of the image file itself ({size_mib:.0f} MiB) {mf:.2f} s; "
                  f"ours takes {statistics.median(to) / mf:.2f}x that, vmdkmount {statistics.median(tt) / mf:.2f}x")
            if a.ab:
                print(f"  ours without read-ahead: median {statistics.median(tp):.2f} s"
                      + (": " + " ".join(f"{x:.2f}" for x in tp) if a.verbose else ""))
            mo, mt = statistics.median(to), statistics.median(tt)
            print(f"{kind + ': ' + name:32} {mo:>8.2f} {mt:>12.2f} {mt / mo:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
