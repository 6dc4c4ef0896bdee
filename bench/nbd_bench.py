#!/usr/bin/env python3
"""Side-by-side NBD server benchmark: `nbdcopy -C N -T N URI null:` of a 2 GiB disk
half full of data, served by vdisk-nbd (the VMDK, read-only), by qemu-nbd (the same VMDK,
read-only, shared: `-r -t -e 0`, which advertises multi-conn) and by `nbdkit file`
(the raw equivalent with holes where the VMDK has none: the ceiling, as no format
needs decoding).

The image is the random one of ../shared/bench/gen.py (1 MiB runs, each data with
p = 0.5), converted to monolithicSparse with vdiskmanager; the raw copy for nbdkit
is made sparse (`cp --sparse=always`) so that all three report the same holes and
nbdcopy reads the same 989 MiB of data from each.

nbdcopy opens at most as many connections as it runs threads (by default one per
core), so `-T N` goes with `-C N`: `-C 4` alone opens two connections on a 2-core host.

For each transport (Unix socket, TCP on 127.0.0.1) and each connection count, the
three servers are started afresh, each gets one untimed warm-up copy, then the
timed copies run interleaved for several rounds. Page cache: warm by default (the
files stay cached - 3 GiB against the host's memory - so the figures compare the
servers' code paths, not the host disk; the warm-up runs make that so for all
three alike); with --cold the caches are dropped (sync; drop_caches = 3) before
every timed copy (needs root). Per case it prints the median MiB/s (virtual size /
wall time of the nbdcopy), the server's median CPU seconds per copy (user+system,
from /proc/PID/stat), its peak RSS (VmHWM from /proc/PID/status, read after the
last round), and the ratios: qemu-nbd time / vdisk time (goal >= 1.5) and vdisk
time / nbdkit time (goal <= 1.2).

usage: nbd_bench.py [--rounds N] [--connections 1,4] [--transports unix,tcp] [--cold]
                    [--size-mib N] [--workdir DIR] [--vdisk-nbd PATH] [--verify] [--verbose]
                    [--only vdisk-nbd,qemu-nbd,nbdkit] [--baseline OTHER-VDISK-NBD]...
"""
import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GEN = os.path.join(ROOT, "..", "shared", "bench", "gen.py")
TICKS = os.sysconf("SC_CLK_TCK")
SERVERS = ("vdisk-nbd", "qemu-nbd", "nbdkit file")


def drop_caches():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    """User + system CPU seconds of pid and its threads so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


class Server:
    """One server process, ready when constructed."""

    def __init__(self, name, cmd, uri, probe):
        self.name, self.uri = name, uri
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        end = time.monotonic() + 20
        while not probe():
            if self.proc.poll() is not None:
                sys.exit(f"{name} exited: {self.proc.stderr.read().decode()}")
            if time.monotonic() > end:
                sys.exit(f"{name} did not start listening")
            time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def unix_probe(path):
    def probe():
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
            return True
        except OSError:
            return False
    return probe


def tcp_probe(port):
    def probe():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False
    return probe


def start_servers(names, transport, tmp, binaries, vmdk, raw):
    """The servers `names` on `transport`: a list of Server. `binaries` maps the
    vdisk-nbd names (the one measured and, with --baseline, another build) to their
    executables."""
    out = []
    for i, name in enumerate(names):
        if transport == "unix":
            sock = os.path.join(tmp, f"{i}.sock")
            where = {"qemu-nbd": ["-k", sock], "nbdkit file": ["-U", sock]}.get(name, ["--socket", sock])
            probe = unix_probe(sock)
            base = f"nbd+unix:///{{}}?socket={sock}"
        else:
            port = free_port()
            where = {"qemu-nbd": ["-b", "127.0.0.1", "-p", str(port)],
                     "nbdkit file": ["-i", "127.0.0.1", "-p", str(port)]}.get(
                         name, ["--bind", "127.0.0.1", "--port", str(port)])
            probe = tcp_probe(port)
            base = f"nbd://127.0.0.1:{port}/{{}}"
        if name == "qemu-nbd":
            cmd = ["qemu-nbd", "-r", "-t", "-e", "0", "-f", "vmdk", "-x", "disk"] + where + [vmdk]
        elif name == "nbdkit file":
            cmd = ["nbdkit", "-f"] + where + ["file", f"file={raw}"]
        else:
            cmd = [binaries[name], "-r"] + where + ["--export", f"disk={vmdk}"]
        out.append(Server(name, cmd, base.format("disk"), probe))
    return out


def copy(server, conns, cold):
    """One nbdcopy of the server's export to null: (seconds, server CPU seconds)."""
    if cold:
        drop_caches()
    c0 = cpu_seconds(server.proc.pid)
    t0 = time.monotonic()
    p = subprocess.run(["nbdcopy", "-C", str(conns), "-T", str(conns), server.uri, "null:"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.monotonic() - t0
    if p.returncode != 0:
        sys.exit(f"nbdcopy from {server.name} failed: {p.stderr}")
    return dt, cpu_seconds(server.proc.pid) - c0


def verify(server, raw):
    """The server's export reads as the raw image."""
    p = subprocess.run(f"nbdcopy '{server.uri}' - | cmp - '{raw}'", shell=True)
    if p.returncode != 0:
        sys.exit(f"{server.name} does not read as {raw}")


def prepare(workdir, size_mib, vdiskmanager):
    os.makedirs(workdir, exist_ok=True)
    raw = os.path.join(workdir, f"random-{size_mib}.raw")
    if not os.path.exists(raw):
        subprocess.run([sys.executable, GEN, raw, str(size_mib), "random"], check=True)
    vmdk = os.path.join(workdir, f"random-{size_mib}.vmdk")
    if not os.path.exists(vmdk):
        subprocess.run([vdiskmanager, "convert", "-q", "-f", "raw", "-t", "0", raw, vmdk], check=True)
    sparse = os.path.join(workdir, f"random-{size_mib}-sparse.raw")
    if not os.path.exists(sparse):
        subprocess.run(["cp", "--sparse=always", raw, sparse], check=True)
    return raw, vmdk, sparse


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--connections", default="1,4")
    ap.add_argument("--transports", default="unix,tcp")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every timed copy")
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--workdir", default=os.path.join(ROOT, "target", "bench"))
    ap.add_argument("--vdisk-nbd", default=os.path.join(ROOT, "target", "release", "vdisk-nbd"))
    ap.add_argument("--vdiskmanager", default=os.path.join(ROOT, "target", "release", "vdiskmanager"))
    ap.add_argument("--verify", action="store_true", help="first check that every server reads as the raw image")
    ap.add_argument("--only", help="comma-separated subset of the servers: vdisk-nbd,qemu-nbd,nbdkit")
    ap.add_argument("--baseline", metavar="PATH", action="append", default=[],
                    help="another vdisk-nbd build, run interleaved as 'vdisk-nbd FILENAME' (A/B of a "
                         "change; repeatable)")
    ap.add_argument("--verbose", action="store_true", help="print every timing")
    a = ap.parse_args()
    for tool, pkg in (("nbdcopy", "libnbd-bin"), ("qemu-nbd", "qemu-utils"), ("nbdkit", "nbdkit")):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (apt-get install {pkg})")
    for b in (a.vdisk_nbd, a.vdiskmanager):
        if not os.path.exists(b):
            sys.exit(f"{b} missing: run cargo build --release -p vdisk-utils first")
    raw, vmdk, sparse = prepare(a.workdir, a.size_mib, a.vdiskmanager)
    mib = a.size_mib
    rows = []
    names = list(SERVERS)
    if a.only:
        keep = a.only.split(",")
        names = [n for n in names if n.split()[0] in keep]
    binaries = {"vdisk-nbd": a.vdisk_nbd}
    for i, b in enumerate(a.baseline):
        name = f"vdisk-nbd {os.path.basename(b)}"
        names.insert(1 + i, name)
        binaries[name] = b
    with tempfile.TemporaryDirectory() as tmp:
        for transport in a.transports.split(","):
            for conns in [int(c) for c in a.connections.split(",")]:
                # Fresh socket paths: nbdkit leaves its socket behind.
                where = tempfile.mkdtemp(dir=tmp)
                servers = start_servers(names, transport, where, binaries, vmdk, sparse)
                try:
                    if a.verify and conns == 1:
                        for s in servers:
                            verify(s, raw)
                    for s in servers:
                        copy(s, conns, False)  # warm-up, untimed
                    times = {s.name: [] for s in servers}
                    cpus = {s.name: [] for s in servers}
                    for _ in range(a.rounds):
                        for s in servers:
                            dt, cpu = copy(s, conns, a.cold)
                            times[s.name].append(dt)
                            cpus[s.name].append(cpu)
                    rss = {s.name: peak_rss_kib(s.proc.pid) for s in servers}
                finally:
                    for s in servers:
                        s.stop()
                case = f"{transport} -C {conns}"
                med = {n: statistics.median(t) for n, t in times.items()}
                for s in servers:
                    n = s.name
                    if a.verbose:
                        print(f"  {case} {n}: " + " ".join(f"{t:.3f}" for t in times[n]), flush=True)
                    rows.append((case, n, mib / med[n], statistics.median(cpus[n]), rss[n] / 1024))
                v = med.get("vdisk-nbd")
                if v and "qemu-nbd" in med:
                    rows.append((case, "ratio qemu-nbd/vdisk (goal >= 1.5)", med["qemu-nbd"] / v, None, None))
                for b in a.baseline:
                    name = f"vdisk-nbd {os.path.basename(b)}"
                    rows.append((case, f"ratio {os.path.basename(b)}/vdisk", med[name] / v, None, None))
                if v and "nbdkit file" in med:
                    rows.append((case, "ratio vdisk/nbdkit (goal <= 1.2)", v / med["nbdkit file"], None, None))
    cache = "cold (caches dropped before each copy)" if a.cold else "warm (page cache)"
    print(f"nbdcopy -C N -T N URI null: of a {mib} MiB disk, {a.rounds} rounds, medians, {cache}")
    print(f"{'case':12} {'server':36} {'MiB/s':>8} {'CPU s':>7} {'peak RSS MiB':>13}")
    for case, name, value, cpu, rss in rows:
        if cpu is None:
            print(f"{case:12} {name:36} {value:7.2f}x")
        else:
            print(f"{case:12} {name:36} {value:8.0f} {cpu:7.2f} {rss:13.1f}")
    print("MiB/s = virtual size / median wall time of nbdcopy; CPU s = the server's median user+system "
          "seconds per copy; peak RSS = VmHWM of the server after all rounds")


if __name__ == "__main__":
    main()
