#!/usr/bin/env python3
"""Side-by-side benchmark: vdiskmanager convert vs qemu-img convert.

Runs both tools interleaved (after one untimed warm-up run each), several rounds,
on the 2 GiB images of ../shared/bench/gen.py (random and text), for raw ->
monolithicSparse, monolithicSparse -> raw, raw -> streamOptimized and
streamOptimized -> raw. Before each timed run the page cache is synced so that
write-back of the previous run does not land in the next one. Prints per-case
median wall times, the ratio (qemu time / our time: >1 means we are faster), peak
memory (max RSS) of each tool, and the output sizes of each tool's raw -> X files.

usage: convert_bench.py [--rounds N] [--size-mib N] [--workdir DIR] [--vdiskmanager PATH]
                        [--kinds random,text] [--formats monolithicSparse,streamOptimized]
                        [--settle SECONDS] [--verbose]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GEN = os.path.join(ROOT, "..", "shared", "bench", "gen.py")


SETTLE = 0.0


def run_timed(cmd):
    """Runs cmd under /usr/bin/time; returns (seconds, max_rss_kib)."""
    subprocess.run(["sync"], check=True)
    if SETTLE:
        # On VMs, memory freed by deleting the previous output may be handed back
        # to the host after a delay; new page-cache pages then cost host faults.
        time.sleep(SETTLE)
    t0 = time.monotonic()
    p = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    dt = time.monotonic() - t0
    if p.returncode != 0:
        sys.exit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr}")
    rss = int(p.stderr.strip().splitlines()[-1])
    return dt, rss


def rm(*paths):
    for p in paths:
        if os.path.exists(p):
            os.remove(p)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--workdir", default=os.path.join(ROOT, "target", "bench"))
    ap.add_argument("--vdiskmanager", default=os.path.join(ROOT, "target", "release", "vdiskmanager"))
    ap.add_argument("--kinds", default="random,text")
    ap.add_argument("--formats", default="monolithicSparse,streamOptimized")
    ap.add_argument("--verbose", action="store_true", help="print every timing")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="seconds to wait after sync before each timed run (cold page-cache memory)")
    args = ap.parse_args()
    global SETTLE
    SETTLE = args.settle
    if not shutil.which("qemu-img"):
        sys.exit("qemu-img is not installed (apt-get install qemu-utils)")
    if not os.path.exists(args.vdiskmanager):
        sys.exit(f"{args.vdiskmanager} missing: run cargo build --release first")
    os.makedirs(args.workdir, exist_ok=True)
    vm = args.vdiskmanager
    results = []
    sizes = []
    for kind in args.kinds.split(","):
        raw = os.path.join(args.workdir, f"{kind}-{args.size_mib}.raw")
        if not os.path.exists(raw):
            subprocess.run([sys.executable, GEN, raw, str(args.size_mib), kind], check=True)
        out_v = os.path.join(args.workdir, "out.vmdk")
        out_r = os.path.join(args.workdir, "out.raw")
        cases = {}
        sources = []
        for subformat, t in (("monolithicSparse", "0"), ("streamOptimized", "5")):
            if subformat not in args.formats.split(","):
                continue
            # Sources for X -> raw: each tool reads its own file (same content).
            src_ours = os.path.join(args.workdir, f"{kind}-{subformat}-ours.vmdk")
            src_qemu = os.path.join(args.workdir, f"{kind}-{subformat}-qemu.vmdk")
            rm(src_ours, src_qemu)
            subprocess.run([vm, "convert", "-q", "-f", "raw", "-O", "vmdk", "-t", t, raw, src_ours], check=True)
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o",
                            f"subformat={subformat}", raw, src_qemu], check=True)
            sources += [src_ours, src_qemu]
            cases[f"{kind}: raw -> {subformat}"] = (
                [vm, "convert", "-q", "-f", "raw", "-O", "vmdk", "-t", t, raw, out_v],
                ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", raw, out_v],
            )
            cases[f"{kind}: {subformat} -> raw"] = (
                [vm, "convert", "-q", "-f", "vmdk", "-O", "raw", src_ours, out_r],
                ["qemu-img", "convert", "-f", "vmdk", "-O", "raw", src_qemu, out_r],
            )
            sizes.append((f"{kind}: raw -> {subformat} output bytes",
                          os.path.getsize(src_ours), os.path.getsize(src_qemu)))
        for name, (ours, qemu) in cases.items():
            t_ours, t_qemu, m_ours, m_qemu = [], [], [], []
            # One untimed warm-up run of each tool (page cache, binaries).
            for cmd in (ours, qemu):
                rm(out_v, out_r)
                run_timed(cmd)
            for _ in range(args.rounds):
                for who, cmd, ts, ms in (("ours", ours, t_ours, m_ours), ("qemu", qemu, t_qemu, m_qemu)):
                    rm(out_v, out_r)
                    dt, rss = run_timed(cmd)
                    ts.append(dt)
                    ms.append(rss)
            rm(out_v, out_r)
            mo, mq = statistics.median(t_ours), statistics.median(t_qemu)
            if args.verbose:
                print(f"{name}: ours {['%.2f' % t for t in t_ours]} qemu {['%.2f' % t for t in t_qemu]}", flush=True)
            results.append((name, mo, mq, mq / mo, max(m_ours), max(m_qemu)))
        rm(*sources)
    print(f"{'case':38} {'ours s':>8} {'qemu s':>8} {'ratio':>6} {'ours MiB':>9} {'qemu MiB':>9}")
    for name, mo, mq, ratio, ro, rq in results:
        print(f"{name:38} {mo:8.3f} {mq:8.3f} {ratio:5.2f}x {ro / 1024:9.1f} {rq / 1024:9.1f}")
    print("ratio = qemu-img median time / vdiskmanager median time (higher is better for us)")
    for name, ours, qemu in sizes:
        print(f"{name:44} ours {ours:>12} qemu {qemu:>12} ({100.0 * ours / qemu:.1f}% of qemu's)")


if __name__ == "__main__":
    main()
