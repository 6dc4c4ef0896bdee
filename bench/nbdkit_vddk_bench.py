#!/usr/bin/env python3
"""nbdkit's VDDK plugin over our libvixDiskLib, side by side with `nbdkit file`.

The copy a VDDK client makes, in one run, as nbdcopy through nbdkit:
  read   a VMDK (monolithicSparse) through `nbdkit vddk` over our library into
         nbdcopy's `null:`, against the raw equivalent through `nbdkit file`;
  write  the raw image through nbdcopy into a new VMDK made by `nbdkit vddk
         create=true` (our library creates and writes it), against writing a new
         raw file through `nbdkit file`.
Medians of the rounds (warm page cache: the CPU cost of each server is compared)
and the ratio `nbdkit file` time / vddk time (>= 1: ours is as fast). The size of
each written VMDK is printed next to `qemu-img convert`'s for the same image.

Debian's nbdkit has no VDDK plugin, so it is not something `.ci/run` can use; pass
one built for the installed nbdkit with --plugin (nbdkit's own source at the tag of
the installed version, `./configure`, then `make -C common/utils` and
`make -C plugins/vddk`: plugins/vddk/.libs/nbdkit-vddk-plugin.so). Our library is
installed into target/vddk by vdisk-ffi/install.sh first.

usage: nbdkit_vddk_bench.py --plugin PATH [--rounds N] [--kinds text,random] [--size-mib M]
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
LIBDIR = os.path.join(ROOT, "target", "vddk")


def timed(cmd):
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


def nbdkit(plugin_args, run):
    return ["nbdkit", "-U", "-", *plugin_args, "--run", run]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plugin", required=True, help="nbdkit-vddk-plugin.so for the installed nbdkit")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--kinds", default="text,random")
    ap.add_argument("--size-mib", type=int, default=2048)
    a = ap.parse_args()
    if not os.path.exists(a.plugin):
        sys.exit(f"{a.plugin}: no such plugin (see --help for how to build one)")
    subprocess.run([os.path.join(ROOT, "vdisk-ffi", "install.sh"), LIBDIR], check=True,
                   stdout=subprocess.DEVNULL)
    work = os.path.join(ROOT, "target", "bench")
    os.makedirs(work, exist_ok=True)
    vdm = os.path.join(ROOT, "target", "release", "vdiskmanager")
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "vdisk-utils"], check=True, cwd=ROOT)
    vddk = [a.plugin, f"libdir={LIBDIR}"]
    print(f"{'case':34} {'vddk s':>8} {'file s':>8} {'ratio':>7}")
    for kind in a.kinds.split(","):
        raw = os.path.join(work, f"{kind}-{a.size_mib}.raw")
        if not os.path.exists(raw):
            subprocess.run([sys.executable, GEN, raw, str(a.size_mib), kind], check=True)
        disk = os.path.join(work, f"nv-{kind}-{a.size_mib}.vmdk")
        if not os.path.exists(disk):
            subprocess.run([vdm, "convert", "-q", "-f", "raw", "-t", "0", raw, disk], check=True)
        size = os.path.getsize(raw)
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            out_vmdk, out_raw = os.path.join(tmp, "out.vmdk"), os.path.join(tmp, "out.raw")
            qemu_vmdk = os.path.join(tmp, "qemu.vmdk")
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", raw, qemu_vmdk], check=True)
            read_vddk = nbdkit([*vddk, f"file={disk}"], 'nbdcopy "$uri" null:')
            read_file = nbdkit(["file", raw], 'nbdcopy "$uri" null:')

            def write_vddk():
                if os.path.exists(out_vmdk):
                    os.remove(out_vmdk)
                return timed(nbdkit([*vddk, f"file={out_vmdk}", "create=true",
                                     "create-type=monolithic-sparse", f"create-size={size}"],
                                    f'nbdcopy {raw} "$uri"'))

            def write_file():
                with open(out_raw, "wb") as f:
                    f.truncate(size)
                return timed(nbdkit(["file", out_raw], f'nbdcopy {raw} "$uri"'))

            timed(read_vddk), timed(read_file)  # warm the page cache
            rv, rf, wv, wf = [], [], [], []
            for _ in range(a.rounds):
                rv.append(timed(read_vddk))
                rf.append(timed(read_file))
                wv.append(write_vddk())
                wf.append(write_file())
            for name, v, f in (("read", rv, rf), ("write", wv, wf)):
                mv, mf = statistics.median(v), statistics.median(f)
                print(f"{kind + ': ' + name:34} {mv:>8.2f} {mf:>8.2f} {mf / mv:>6.2f}x", flush=True)
            same = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "vmdk", raw, out_vmdk],
                                  stdout=subprocess.DEVNULL).returncode == 0
            print(f"  written VMDK {os.path.getsize(out_vmdk) / 2**20:.0f} MiB, qemu-img convert's "
                  f"{os.path.getsize(qemu_vmdk) / 2**20:.0f} MiB; identical to the raw image: {same}")
            if not same:
                sys.exit("the VMDK written through nbdkit's vddk plugin differs from its source")


if __name__ == "__main__":
    main()
