#!/usr/bin/env python3
"""Side-by-side benchmark of the C API's remote transport: reading a 2 GiB disk half
full of data through libvixDiskLib over `nbd` (from a vdisk-nbd server), through
libvixDiskLib on the local file, and with `nbdcopy -C 4 -T 4` from the same server.

The reader is vdisk-proxy (examples/proxy), which calls the C API as a C program does
(ConnectEx, Open, ReadAsync with N requests of 1 MiB in flight, Wait, Close): the same
program for the local file and for the server, only ConnectEx's serverName differs.
Two ways of reading:
  full       every sector of the disk (holes arrive as NBD hole chunks);
  allocated  QueryAllocatedBlocks first (chunks of 64 KiB), then only the allocated
             chunks - what backup software does, and what nbdcopy does (it skips the
             holes base:allocation reports), so this is the case to set against it.
Each run is timed as a whole process (start, connect, open, read, close), nbdcopy too.

The image is the random one of ../shared/bench/gen.py (2 GiB, 1 MiB runs, each data
with p = 0.5: 989 MiB of data), converted to monolithicSparse with vdiskmanager; the
server is `vdisk-nbd -r --export disk=VMDK` on a Unix socket and on TCP 127.0.0.1.
Every case gets an untimed warm-up run, then the runs are interleaved for several
rounds; the page cache is warm. Printed per case: median MiB/s (virtual size / wall
time), the server's median CPU seconds per run, the reader's peak RSS; then the
ratios (goals): nbd / local (>= 0.8), nbd allocated against nbdcopy (nbdcopy time /
ours, >= 0.9); and QueryAllocatedBlocks over the whole disk through nbd and locally
(median of --query-repeat calls, goal < 10 ms).

Last, the ceiling of any network reader here: vdisk-loopback (examples/loopback.rs)
moves the raw image's bytes over a Unix socket and over TCP with sendfile, no
protocol, against pread of the same bytes - a reader of data over that socket can
reach at most that ratio of a local read.

--baseline OTHER-PROXY (repeatable) adds another vdisk-proxy build's nbd runs,
interleaved, for A/B runs of a client change.

usage: remote_bench.py [--rounds N] [--in-flight 4,16] [--transports unix,tcp]
                       [--baseline PROXY]... [--verify] [--verbose]
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def prepare(workdir, vdiskmanager):
    os.makedirs(workdir, exist_ok=True)
    raw = os.path.join(workdir, "random-2048.raw")
    if not os.path.exists(raw):
        subprocess.run([sys.executable, GEN, raw, "2048", "random"], check=True)
    vmdk = os.path.join(workdir, "random-2048.vmdk")
    if not os.path.exists(vmdk):
        subprocess.run([vdiskmanager, "convert", "-q", "-f", "raw", "-t", "0", raw, vmdk], check=True)
    return raw, vmdk


class Server:
    def __init__(self, binary, vmdk, transport, tmp):
        if transport == "unix":
            sock = os.path.join(tmp, "nbd.sock")
            where = ["--socket", sock]
            self.server_name = f"unix:{sock}"
            self.port = None
            self.uri = f"nbd+unix:///disk?socket={sock}"
        else:
            self.port = free_port()
            where = ["--bind", "127.0.0.1", "--port", str(self.port)]
            self.server_name = "127.0.0.1"
            self.uri = f"nbd://127.0.0.1:{self.port}/disk"
        self.proc = subprocess.Popen([binary, "-r"] + where + ["--export", f"disk={vmdk}"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        end = time.monotonic() + 20
        while True:
            try:
                if self.port is None:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(sock)
                else:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None:
                    sys.exit(f"vdisk-nbd exited: {self.proc.stderr.read().decode()}")
                if time.monotonic() > end:
                    sys.exit("vdisk-nbd did not start listening")
                time.sleep(0.05)

    def proxy_args(self):
        a = ["--server", self.server_name, "--modes", "nbd"]
        if self.port is not None:
            a += ["--port", str(self.port)]
        return a + ["disk"]

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def run_proxy(cmd):
    """(seconds, the proxy's stdout, its peak RSS KiB)."""
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.monotonic() - t0
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {p.stderr}")
    rss = 0
    for line in p.stdout.splitlines():
        if line.startswith("proxy: ") and "peak RSS" in line:
            rss = int(line.rsplit("peak RSS ", 1)[1].split()[0])
    return dt, p.stdout, rss


def run_nbdcopy(uri):
    t0 = time.monotonic()
    p = subprocess.run(["nbdcopy", "-C", "4", "-T", "4", uri, "null:"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        sys.exit(f"nbdcopy failed: {p.stderr}")
    return time.monotonic() - t0, "", 0


def query_ms(cmd):
    out = run_proxy(cmd)[1]
    for line in out.splitlines():
        if line.startswith("allocated "):
            return float(line.split()[1])
    sys.exit(f"no allocated line from {' '.join(cmd)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--in-flight", default="4,16", help="ReadAsync requests in flight (list)")
    ap.add_argument("--transports", default="unix,tcp")
    ap.add_argument("--query-repeat", type=int, default=21)
    ap.add_argument("--workdir", default=os.path.join(ROOT, "target", "bench"))
    ap.add_argument("--vdisk-nbd", default=os.path.join(ROOT, "target", "release", "vdisk-nbd"))
    ap.add_argument("--vdisk-proxy", default=os.path.join(ROOT, "target", "release", "vdisk-proxy"))
    ap.add_argument("--vdiskmanager", default=os.path.join(ROOT, "target", "release", "vdiskmanager"))
    ap.add_argument("--vdisk-loopback", default=os.path.join(ROOT, "target", "release", "vdisk-loopback"))
    ap.add_argument("--baseline", metavar="PROXY", action="append", default=[],
                    help="another vdisk-proxy build whose nbd runs go interleaved (A/B)")
    ap.add_argument("--verify", action="store_true",
                    help="first check that every reader's SHA-256 is the raw image's")
    ap.add_argument("--verbose", action="store_true", help="print every timing")
    a = ap.parse_args()
    if not shutil.which("nbdcopy"):
        sys.exit("nbdcopy is not installed (apt-get install libnbd-bin)")
    for b in (a.vdisk_nbd, a.vdisk_proxy, a.vdiskmanager, a.vdisk_loopback):
        if not os.path.exists(b):
            sys.exit(f"{b} missing: run cargo build --release -p vdisk-utils -p vdisk-proxy "
                     "-p vdisk-examples first")
    raw, vmdk = prepare(a.workdir, a.vdiskmanager)
    size_mib = os.path.getsize(raw) / (1 << 20)
    proxies = {"": a.vdisk_proxy}
    for b in a.baseline:
        proxies[f" [{os.path.basename(b)}]"] = b
    in_flight = [int(n) for n in a.in_flight.split(",")]
    rows = []
    queries = []
    with tempfile.TemporaryDirectory() as tmp:
        for transport in a.transports.split(","):
            where = tempfile.mkdtemp(dir=tmp)
            server = Server(a.vdisk_nbd, vmdk, transport, where)
            try:
                cases = {}
                for n in in_flight:
                    for how in ("full", "allocated"):
                        extra = ["--check", "none", "--in-flight", str(n)]
                        if how == "allocated":
                            extra.append("--allocated")
                        cases[f"local {how} x{n}"] = (run_proxy, [a.vdisk_proxy] + extra + [vmdk])
                        for tag, binary in proxies.items():
                            cases[f"nbd {how} x{n}{tag}"] = (
                                run_proxy, [binary] + extra + server.proxy_args())
                cases["nbdcopy -C 4 -T 4"] = (run_nbdcopy, server.uri)
                if a.verify:
                    want = subprocess.run(["sha256sum", raw], capture_output=True, text=True,
                                          check=True).stdout.split()[0]
                    for name, (fn, cmd) in cases.items():
                        if fn is run_proxy:
                            out = run_proxy([c if c != "none" else "sha256" for c in cmd])[1]
                            got = next(l.split()[1] for l in out.splitlines() if l.startswith("disk "))
                            if got != want:
                                sys.exit(f"{name}: SHA-256 {got}, the raw image's is {want}")
                    print(f"{transport}: every reader's SHA-256 is the raw image's", flush=True)
                for name, (fn, cmd) in cases.items():
                    fn(cmd)  # warm-up, untimed
                times = {n: [] for n in cases}
                cpus = {n: [] for n in cases}
                rss = {n: 0 for n in cases}
                for _ in range(a.rounds):
                    for name, (fn, cmd) in cases.items():
                        c0 = cpu_seconds(server.proc.pid)
                        dt, _, r = fn(cmd)
                        times[name].append(dt)
                        cpus[name].append(cpu_seconds(server.proc.pid) - c0)
                        rss[name] = max(rss[name], r)
                server_rss = peak_rss_kib(server.proc.pid)
                qcmd = ["--query-only", "--repeat", str(a.query_repeat)]
                queries.append((transport, query_ms([a.vdisk_proxy] + qcmd + server.proxy_args()),
                                query_ms([a.vdisk_proxy] + qcmd + [vmdk])))
            finally:
                server.stop()
            med = {n: statistics.median(t) for n, t in times.items()}
            for name in cases:
                if a.verbose:
                    print(f"  {transport} {name}: " + " ".join(f"{t:.3f}" for t in times[name]))
                remote = name.startswith("nbd")
                rows.append((transport, name, size_mib / med[name],
                             statistics.median(cpus[name]) if remote else None,
                             rss[name] / 1024 if rss[name] else None))
            for n in in_flight:
                for how in ("full", "allocated"):
                    for tag in proxies:
                        nbd = med[f"nbd {how} x{n}{tag}"]
                        rows.append((transport, f"ratio nbd/local {how} x{n}{tag} (goal >= 0.8)",
                                     med[f"local {how} x{n}"] / nbd, "ratio", None))
                for tag in proxies:
                    nbd = med[f"nbd allocated x{n}{tag}"]
                    rows.append((transport, f"ratio nbd allocated x{n}{tag} vs nbdcopy (goal >= 0.9)",
                                 med["nbdcopy -C 4 -T 4"] / nbd, "ratio", None))
            rows.append((transport, "server peak RSS (VmHWM)", server_rss / 1024, "MiB", None))
    print(f"Reading a {size_mib:.0f} MiB disk (half data) through the C API: {a.rounds} rounds, "
          f"medians, warm page cache")
    print(f"{'transport':9} {'case':72} {'MiB/s':>8} {'srv CPU s':>9} {'reader RSS MiB':>14}")
    for transport, name, value, cpu, rss in rows:
        if cpu == "ratio":
            print(f"{transport:9} {name:72} {value:7.2f}x")
        elif cpu == "MiB":
            print(f"{transport:9} {name:72} {value:7.1f} MiB")
        else:
            c = f"{cpu:9.2f}" if cpu is not None else f"{'':9}"
            r = f"{rss:14.1f}" if rss is not None else ""
            print(f"{transport:9} {name:72} {value:8.0f} {c} {r}")
    for transport, remote, local in queries:
        print(f"QueryAllocatedBlocks of the whole disk (chunk 128 sectors), median of "
              f"{a.query_repeat}: nbd over {transport} {remote:.2f} ms (goal < 10 ms), "
              f"local {local:.2f} ms")
    print("MiB/s = virtual size / median wall time of the whole process (nbdcopy's too); "
          "srv CPU s = the server's median user+system seconds per run")
    ceiling = subprocess.run([a.vdisk_loopback, raw, str(int(size_mib)), str(a.rounds)],
                             capture_output=True, text=True, check=True).stdout
    print(ceiling, end="")


if __name__ == "__main__":
    main()
