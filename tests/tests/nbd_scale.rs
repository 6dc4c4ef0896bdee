//! `vdisk-nbd` at scale: a datastore of 64 sparse disks of 64 MiB, each with data
//! of its own, read by 8 `nbdcopy` clients at once (4 connections each: 32
//! connections), first every client from exports of its own, then four clients on
//! each of two exports. Every byte each client copied must be the disk's; the
//! server's peak memory (`VmHWM`) must stay under 256 MiB. The aggregate throughput
//! is printed, never asserted.

use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use vdisk_interop::{require_tool_from, run, tempdir, NbdServer, ScaleStore, MIB};

const DISKS: usize = 64;
const DISK_BYTES: u64 = 64 * MIB;
const CLIENTS: usize = 8;
/// Connections per client (`nbdcopy -C 4 -T 4`: nbdcopy opens no more connections
/// than it has threads, which default to the number of cores).
const CONNECTIONS: &str = "4";
const MAX_SERVER_RSS: u64 = 256 * MIB;
/// Compares the copy `got` of disk `d` with what the disk holds, 1 MiB at a time.
fn check_copy(store: &ScaleStore, d: usize, got: &Path, who: &str) {
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
        store.expected(d, offset, &mut want);
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
    let root = dir.path().join("ds");
    let store = ScaleStore::create(&root, DISKS, DISK_BYTES, 15);
    let server = NbdServer::start(&["--datastore".to_string(), format!("ds={}", root.display())]);
    let rounds = DISKS / CLIENTS + 1;
    let barrier = Barrier::new(CLIENTS);
    // Per client: (start, end) of each round's copy.
    let spans: Vec<Vec<(Instant, Instant)>> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (server, store, barrier) = (&server, &store, &barrier);
                let out: PathBuf = dir.path().join(format!("client{c}.raw"));
                s.spawn(move || {
                    let mut spans = Vec::new();
                    for r in 0..rounds {
                        let d = disk_of(c, r);
                        let uri = server.uri(&ScaleStore::export_name(d));
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
                        check_copy(store, d, &out, &format!("client {c}, round {r}"));
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
        .map(|d| store.data_bytes(d))
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
