//! `vdisk-nbd` at scale: a datastore of 64 sparse disks of 64 MiB, each with data
//! of its own, read by 8 `nbdcopy` clients at once (4 connections each: 32
//! connections), first every client from exports of its own, then four clients on
//! each of two exports. Every byte each client copied must be the disk's; the
//! server's peak memory (`VmHWM`) must stay under 256 MiB. The aggregate throughput
//! is printed, never asserted.

use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use vdisk::{create, CreateOptions, DiskType, OpenOptions};
use vdisk_interop::{pattern, require_tool_from, run, tempdir, NbdServer, KIB, MIB};

const DISKS: usize = 64;
const DISK_BYTES: u64 = 64 * MIB;
const CLIENTS: usize = 8;
/// Connections per client (`nbdcopy -C 4 -T 4`: nbdcopy opens no more connections
/// than it has threads, which default to the number of cores).
const CONNECTIONS: &str = "4";
const MAX_SERVER_RSS: u64 = 256 * MIB;
/// Data runs per disk, one in each eighth of it.
const RUNS: u64 = 8;

/// The export name of disk `d` in datastore `ds`.
fn export_name(d: usize) -> String {
    format!("[ds] vm{d:02}/vm{d:02}.vmdk")
}

/// The data runs of disk `d`: (disk offset, offset in the shared pattern, length).
/// Offsets and lengths differ from disk to disk (and are not sector-aligned), and
/// each run takes its bytes from a different place of the pattern, so no two disks
/// hold the same data.
fn runs(d: usize) -> Vec<(u64, usize, u64)> {
    let d = d as u64;
    (0..RUNS)
        .map(|i| {
            let offset = i * (DISK_BYTES / RUNS) + d * 64 * KIB + d * 7 + i;
            let source = ((d * RUNS + i) * 4 * KIB) as usize;
            let len = 768 * KIB + d * 1000 + i * 4096;
            (offset, source, len)
        })
        .collect()
}

/// The largest pattern offset any run reads, plus its length.
fn pattern_bytes() -> usize {
    (0..DISKS)
        .flat_map(runs)
        .map(|(_, s, l)| s + l as usize)
        .max()
        .unwrap()
}

/// What disk `d` holds at `[offset, offset + buf.len())`.
fn expected(d: usize, data: &[u8], offset: u64, buf: &mut [u8]) {
    buf.fill(0);
    let end = offset + buf.len() as u64;
    for (at, source, len) in runs(d) {
        let (lo, hi) = (at.max(offset), (at + len).min(end));
        if lo < hi {
            let n = (hi - lo) as usize;
            let from = source + (lo - at) as usize;
            let to = (lo - offset) as usize;
            buf[to..to + n].copy_from_slice(&data[from..from + n]);
        }
    }
}

fn make_disks(root: &Path, data: &[u8]) {
    for d in 0..DISKS {
        let dir = root.join(format!("vm{d:02}"));
        std::fs::create_dir(&dir).unwrap();
        let p = dir.join(format!("vm{d:02}.vmdk"));
        create(
            &p,
            &CreateOptions::new(DiskType::MonolithicSparse, DISK_BYTES),
        )
        .unwrap();
        let disk = OpenOptions::new().write(true).open(&p).unwrap();
        for (at, source, len) in runs(d) {
            disk.write_at(&data[source..source + len as usize], at)
                .unwrap();
        }
        disk.close().unwrap();
    }
}

/// Compares the copy `got` of disk `d` with what the disk holds, 1 MiB at a time.
fn check_copy(d: usize, data: &[u8], got: &Path, who: &str) {
    use std::io::Read;
    let mut f = std::fs::File::open(got).unwrap();
    assert_eq!(
        f.metadata().unwrap().len(),
        DISK_BYTES,
        "{who}: the copy of disk {d} has the wrong size"
    );
    let mut have = vec![0u8; MIB as usize];
    let mut want = vec![0u8; MIB as usize];
    let mut offset = 0;
    while offset < DISK_BYTES {
        f.read_exact(&mut have).unwrap();
        expected(d, data, offset, &mut want);
        if have != want {
            let i = have.iter().zip(&want).position(|(a, b)| a != b).unwrap();
            panic!(
                "{who}: disk {d} differs at byte {}: got {:#04x}, expected {:#04x}",
                offset + i as u64,
                have[i],
                want[i]
            );
        }
        offset += MIB;
    }
}

/// The disk client `c` reads in round `r`: rounds 0-7 spread the clients over all
/// 64 disks, one each; the last round puts four clients on each of disks 0 and 1.
fn disk_of(c: usize, r: usize) -> usize {
    if r < DISKS / CLIENTS {
        c * (DISKS / CLIENTS) + r
    } else {
        c % 2
    }
}

#[test]
fn sixty_four_exports_eight_clients_at_once_in_bounded_memory() {
    require_tool_from("nbdcopy", "libnbd-bin");
    let dir = tempdir();
    let store = dir.path().join("ds");
    std::fs::create_dir(&store).unwrap();
    let data = pattern(15, pattern_bytes());
    make_disks(&store, &data);
    let server = NbdServer::start(&["--datastore".to_string(), format!("ds={}", store.display())]);
    let rounds = DISKS / CLIENTS + 1;
    let barrier = Barrier::new(CLIENTS);
    // Per client: (start, end) of each round's copy.
    let spans: Vec<Vec<(Instant, Instant)>> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (server, data, barrier) = (&server, &data, &barrier);
                let out: PathBuf = dir.path().join(format!("client{c}.raw"));
                s.spawn(move || {
                    let mut spans = Vec::new();
                    for r in 0..rounds {
                        let d = disk_of(c, r);
                        let uri = server.uri(&export_name(d));
                        let _ = std::fs::remove_file(&out);
                        barrier.wait();
                        let t0 = Instant::now();
                        run(
                            "nbdcopy",
                            &[
                                "-C",
                                CONNECTIONS,
                                "-T",
                                CONNECTIONS,
                                &uri,
                                out.to_str().unwrap(),
                            ],
                        );
                        spans.push((t0, Instant::now()));
                        check_copy(d, data, &out, &format!("client {c}, round {r}"));
                    }
                    let _ = std::fs::remove_file(&out);
                    spans
                })
            })
            .collect();
        clients.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let peak = server.peak_rss_bytes();
    // A round lasts from its first copy's start to its last copy's end.
    let busy: Duration = (0..rounds)
        .map(|r| {
            let start = spans.iter().map(|s| s[r].0).min().unwrap();
            let end = spans.iter().map(|s| s[r].1).max().unwrap();
            end - start
        })
        .sum();
    let copies = (CLIENTS * rounds) as u64;
    let data_bytes: u64 = (0..CLIENTS)
        .flat_map(|c| (0..rounds).map(move |r| disk_of(c, r)))
        .map(|d| runs(d).iter().map(|r| r.2).sum::<u64>())
        .sum();
    let secs = busy.as_secs_f64();
    println!(
        "nbd_scale: {copies} copies of 64 MiB ({DISKS} exports, {CLIENTS} clients x {CONNECTIONS} \
         connections at once) in {secs:.2} s: {:.0} MiB/s of disk, {:.0} MiB/s of data; server peak \
         RSS {:.1} MiB",
        (copies * DISK_BYTES) as f64 / MIB as f64 / secs,
        data_bytes as f64 / MIB as f64 / secs,
        peak as f64 / MIB as f64
    );
    assert!(
        peak < MAX_SERVER_RSS,
        "the server's peak RSS was {peak} bytes (limit {MAX_SERVER_RSS})"
    );
    assert!(server.stop().success(), "vdisk-nbd did not stop cleanly");
}
