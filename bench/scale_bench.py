#!/usr/bin/env python3
"""Side-by-side benchmark of cost against virtual size: vdiskmanager vs qemu-img on
disks that are huge and nearly empty, where work should follow the data.

Cases (each tool on the same input, interleaved after an untimed warm-up, median of
--rounds runs; ratio = qemu-img time / ours, > 1 means we are faster):
  info / map of an empty 1 TB and 8 TB monolithicSparse disk (made by vdiskmanager;
      qemu-img reads it as well), and our time 8 TB / 1 TB (goal: about 1, time
      follows the data, not the size);
  a 5 GiB sparse raw file holding 8 MiB of data (8 runs of 1 MiB, random bytes)
      converted to each VMDK type (qemu-img's subformat of the same layout:
      vmfs and vmfsThin against monolithicFlat, which qemu-img writes the same way);
  a 64 GiB monolithicSparse disk holding 256 MiB of data (64 runs of 4 MiB)
      converted to monolithicSparse, streamOptimized and raw.
Printed per case: medians, the ratio, and each tool's peak RSS.

usage: scale_bench.py [--rounds N] [--workdir DIR] [--vdiskmanager PATH] [--verbose]
"""
import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MIB = 1 << 20
GIB = 1 << 30

# Our -t number, and the qemu-img subformat written the same way.
TYPES = [
    ("monolithicSparse", 0, "monolithicSparse"),
    ("twoGbMaxExtentSparse", 1, "twoGbMaxExtentSparse"),
    ("monolithicFlat", 2, "monolithicFlat"),
    ("twoGbMaxExtentFlat", 3, "twoGbMaxExtentFlat"),
    ("vmfs", 4, "monolithicFlat"),
    ("streamOptimized", 5, "streamOptimized"),
    ("vmfsThin", 6, "monolithicFlat"),
]


def run(cmd):
    """Runs cmd under GNU time; returns (seconds, peak RSS in KiB). (The rusage of
    a child forked from Python counts Python's own memory before the exec.)"""
    t0 = time.monotonic()
    p = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    dt = time.monotonic() - t0
    if p.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{p.stderr}")
    return dt, int(p.stderr.strip().splitlines()[-1])


def remove_disk(path):
    """Removes a VMDK and its extent files (named after it) or a raw file."""
    folder, name = os.path.split(path)
    stem = name[:-5] if name.endswith(".vmdk") else name
    for f in os.listdir(folder or "."):
        if f == name or (name.endswith(".vmdk") and f.startswith(stem + "-")):
            os.remove(os.path.join(folder, f))


def sparse_raw(path, size, runs, run_bytes, seed):
    """A sparse raw file of `size` bytes with `runs` runs of random data."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        slots = size // run_bytes
        for slot in sorted(rng.sample(range(slots), runs)):
            f.seek(slot * run_bytes)
            f.write(rng.randbytes(run_bytes))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workdir", default=os.path.join(ROOT, "target", "bench", "scale"))
    ap.add_argument("--vdiskmanager", default=os.path.join(ROOT, "target", "release", "vdiskmanager"))
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    vm = a.vdiskmanager
    if not os.path.exists(vm):
        sys.exit(f"{vm} missing: run cargo build --release -p vdisk-utils first")
    if not os.path.exists("/usr/bin/time"):
        sys.exit("/usr/bin/time is not installed (apt-get install time)")
    if not shutil.which("qemu-img"):
        sys.exit("qemu-img is not installed (apt-get install qemu-utils)")
    shutil.rmtree(a.workdir, ignore_errors=True)
    os.makedirs(a.workdir)
    w = lambda n: os.path.join(a.workdir, n)

    # Inputs.
    for tb in (1, 8):
        subprocess.run([vm, "-c", "-s", f"{tb}TB", "-t", "0", "-q", w(f"empty-{tb}t.vmdk")], check=True)
    sparse_raw(w("sparse-5g.raw"), 5 * GIB, 8, MIB, 1)
    sparse_raw(w("data-64g.raw"), 64 * GIB, 64, 4 * MIB, 2)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o",
                    "subformat=monolithicSparse", w("data-64g.raw"), w("data-64g.vmdk")], check=True)
    os.remove(w("data-64g.raw"))

    # name -> (ours, qemu-img, output files to remove after each run)
    cases = {}
    for tb in (1, 8):
        d = w(f"empty-{tb}t.vmdk")
        cases[f"info, empty {tb} TB"] = ([vm, "info", d], ["qemu-img", "info", d], [])
        cases[f"map, empty {tb} TB"] = ([vm, "map", d], ["qemu-img", "map", d], [])
    src = w("sparse-5g.raw")
    for name, t, sub in TYPES:
        ours, theirs = w(f"o-{name}.vmdk"), w(f"q-{name}.vmdk")
        cases[f"5 GiB raw (8 MiB data) -> {name}"] = (
            [vm, "convert", "-q", "-f", "raw", "-O", "vmdk", "-t", str(t), src, ours],
            ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={sub}", src, theirs],
            [ours, theirs])
    src = w("data-64g.vmdk")
    for name, ours_args, q_args, ext in [
        ("monolithicSparse", ["-O", "vmdk", "-t", "0"], ["-O", "vmdk", "-o", "subformat=monolithicSparse"], "vmdk"),
        ("streamOptimized", ["-O", "vmdk", "-t", "5"], ["-O", "vmdk", "-o", "subformat=streamOptimized"], "vmdk"),
        ("raw", ["-O", "raw"], ["-O", "raw"], "raw"),
    ]:
        ours, theirs = w(f"o64-{name}.{ext}"), w(f"q64-{name}.{ext}")
        cases[f"64 GiB sparse (256 MiB data) -> {name}"] = (
            [vm, "convert", "-q", "-f", "vmdk"] + ours_args + [src, ours],
            ["qemu-img", "convert", "-f", "vmdk"] + q_args + [src, theirs],
            [ours, theirs])

    def once(cmd, outputs):
        for o in outputs:
            remove_disk(o)
        return run(cmd)

    for ours, theirs, outs in cases.values():
        once(ours, outs)
        once(theirs, outs)
    times = {n: ([], []) for n in cases}
    rss = {n: [0, 0] for n in cases}
    for _ in range(a.rounds):
        for n, (ours, theirs, outs) in cases.items():
            for i, cmd in enumerate((ours, theirs)):
                dt, r = once(cmd, outs)
                times[n][i].append(dt)
                rss[n][i] = max(rss[n][i], r)
    for outs in (c[2] for c in cases.values()):
        for o in outs:
            remove_disk(o)

    print(f"vdiskmanager vs qemu-img, median of {a.rounds} (ratio = qemu-img time / ours, > 1: we are faster)")
    print(f"{'case':48} {'ours s':>9} {'qemu s':>9} {'ratio':>8} {'our RSS':>9} {'qemu RSS':>9}")
    med = {}
    for n in cases:
        o, q = statistics.median(times[n][0]), statistics.median(times[n][1])
        med[n] = (o, q)
        print(f"{n:48} {o:9.3f} {q:9.3f} {q / o:7.2f}x {rss[n][0] / 1024:6.1f} MiB {rss[n][1] / 1024:6.1f} MiB")
        if a.verbose:
            print("    ours " + " ".join(f"{t:.3f}" for t in times[n][0]))
            print("    qemu " + " ".join(f"{t:.3f}" for t in times[n][1]))
    for what in ("info", "map"):
        o1, q1 = med[f"{what}, empty 1 TB"]
        o8, q8 = med[f"{what}, empty 8 TB"]
        print(f"{what}: time 8 TB / 1 TB: ours {o8 / o1:.2f}, qemu-img {q8 / q1:.2f} "
              "(1.00: cost independent of the virtual size)")


if __name__ == "__main__":
    main()
