#!/usr/bin/env python3
"""Side-by-side read benchmark: the C API (libvixDiskLib, VMware-style sample's
`-readbench`) against the Rust API (`vdisk-readbench`) on the same disks.

Both read the whole disk sequentially in 1 MiB requests (2048 sectors). The runs are
interleaved, after one untimed warm-up run each (the data is then in the page
cache, so the figures compare the two code paths, not the host disk). Prints the
median throughput of each and the ratio C / Rust (the C API should reach >= 90%).

Disks: monolithicSparse and monolithicFlat copies of the 2 GiB random image of
../shared/bench/gen.py (made with vdiskmanager if missing, in target/bench).

usage: readbench.py [--rounds N] [--layout target/vddk]
"""
import argparse
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GEN = os.path.join(ROOT, "..", "shared", "bench", "gen.py")
LINE = re.compile(r"readbench: (\d+) bytes in ([0-9.]+) s: ([0-9.]+) MiB/s")


def mib_s(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    m = LINE.search(out)
    if not m:
        sys.exit(f"no readbench line from {' '.join(cmd)}:\n{out}")
    return float(m.group(3))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layout", default=os.path.join(ROOT, "target", "vddk"))
    a = ap.parse_args()
    work = os.path.join(ROOT, "target", "bench")
    os.makedirs(work, exist_ok=True)
    vdm = os.path.join(ROOT, "target", "release", "vdiskmanager")
    rust = os.path.join(ROOT, "target", "release", "vdisk-readbench")
    sample = os.path.join(work, "vixDiskLibSample")
    lib = os.path.join(a.layout, "lib64")
    subprocess.run(["gcc", "-std=c99", "-O2", "-I", os.path.join(a.layout, "include"),
                    os.path.join(ROOT, "examples", "c", "vixDiskLibSample.c"), "-o", sample,
                    "-L", lib, "-Wl,-rpath," + lib, "-lvixDiskLib", "-pthread"], check=True)
    raw = os.path.join(work, "random-2048.raw")
    if not os.path.exists(raw):
        subprocess.run([sys.executable, GEN, raw, "2048", "random"], check=True)
    print(f"{'disk':<22} {'C API MiB/s':>12} {'Rust MiB/s':>11} {'C / Rust':>9}")
    for t, name in [("0", "monolithicSparse"), ("2", "monolithicFlat")]:
        disk = os.path.join(work, f"rb-{name}.vmdk")
        if not os.path.exists(disk):
            subprocess.run([vdm, "convert", "-q", "-f", "raw", "-t", t, raw, disk], check=True)
        c_cmd = [sample, "-readbench", "2048", disk]
        r_cmd = [rust, disk, "2048"]
        mib_s(c_cmd)
        mib_s(r_cmd)
        cs, rs = [], []
        for _ in range(a.rounds):
            cs.append(mib_s(c_cmd))
            rs.append(mib_s(r_cmd))
        c, r = statistics.median(cs), statistics.median(rs)
        print(f"{name:<22} {c:>12.0f} {r:>11.0f} {c / r:>8.1%}")


if __name__ == "__main__":
    main()
