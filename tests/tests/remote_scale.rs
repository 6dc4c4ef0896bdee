//! The C API's `nbd` transport at scale: 8 proxy processes (`vdisk-proxy`, which
//! reads through libvixDiskLib's ConnectEx/Open/ReadAsync as a backup proxy does)
//! each pulling 8 disks at once from one `vdisk-nbd --datastore` server - 64
//! sparse disks of 64 MiB, each with data of its own, 64 disk handles at once.
//! Half the proxies read every sector; the other half ask QueryAllocatedBlocks
//! first and read only the allocated chunks, as backup software does. Every byte is
//! checked: each proxy reports the SHA-256 of each whole disk, which must be that
//! of the disk's known content. Printed, never asserted: the aggregate MiB/s; the
//! peak RSS of the server and of the largest proxy are printed and bounded.

use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vdisk_interop::{stdout_text, tempdir, vdisk_proxy_bin, NbdServer, ScaleStore, KIB, MIB};

const PROXIES: usize = 8;
const DISKS_PER_PROXY: usize = 8;
const DISKS: usize = PROXIES * DISKS_PER_PROXY;
const DISK_BYTES: u64 = 64 * MIB;
/// Data runs per disk, one in each eighth of it.
const MAX_SERVER_RSS: u64 = 256 * MIB;
const MAX_PROXY_RSS: u64 = 256 * MIB;

/// A proxy's report: (disk name -> (sum, bytes read)), bytes it read, peak RSS.
struct Report {
    sums: Vec<(String, String, u64)>,
    mib_s: f64,
    rss: u64,
}

fn parse(out: &str) -> Report {
    let mut sums = Vec::new();
    let mut summary = None;
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("disk ") {
            let mut f = rest.splitn(3, ' ');
            let (sum, bytes, name) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
            sums.push((name.to_string(), sum.to_string(), bytes.parse().unwrap()));
        } else if let Some(rest) = line.strip_prefix("proxy: ") {
            // "... in S s: X MiB/s, peak RSS N KiB"
            let mib_s: f64 = rest
                .split(": ")
                .nth(1)
                .and_then(|s| s.split(' ').next())
                .and_then(|s| s.parse().ok())
                .unwrap();
            let rss: u64 = rest
                .rsplit("peak RSS ")
                .next()
                .and_then(|s| s.split(' ').next())
                .and_then(|s| s.parse().ok())
                .unwrap();
            summary = Some((mib_s, rss * KIB));
        }
    }
    let (mib_s, rss) = summary.unwrap_or_else(|| panic!("no summary line in:\n{out}"));
    Report { sums, mib_s, rss }
}

#[test]
fn eight_proxies_pull_eight_disks_each_through_the_c_api() {
    let proxy = vdisk_proxy_bin();
    let dir = tempdir();
    let root = dir.path().join("ds");
    let store = ScaleStore::create(&root, DISKS, DISK_BYTES, 16);
    // The content each disk must read as, summed on two threads.
    let expected: Vec<String> = std::thread::scope(|s| {
        let halves: Vec<_> = (0..2)
            .map(|h| {
                let store = &store;
                s.spawn(move || {
                    (h * DISKS / 2..(h + 1) * DISKS / 2)
                        .map(|d| store.expected_sha256(d))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        halves.into_iter().flat_map(|t| t.join().unwrap()).collect()
    });
    let server = NbdServer::start(&[
        "-r".to_string(),
        "--datastore".into(),
        format!("ds={}", root.display()),
    ]);
    let server_name = format!("unix:{}", server.socket.display());

    // All proxies at once; each waited for on a thread of its own, so that a hang
    // fails the test instead of blocking it.
    let t0 = Instant::now();
    let (tx, rx) = mpsc::channel();
    for p in 0..PROXIES {
        let mut cmd = Command::new(&proxy);
        cmd.args([
            "--server",
            &server_name,
            "--modes",
            "nbd",
            "--in-flight",
            "4",
        ]);
        if p >= PROXIES / 2 {
            cmd.arg("--allocated");
        }
        cmd.args((0..DISKS_PER_PROXY).map(|i| ScaleStore::export_name(p * DISKS_PER_PROXY + i)));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vdisk-proxy");
        let tx = tx.clone();
        std::thread::spawn(move || {
            let out = child.wait_with_output().expect("wait for vdisk-proxy");
            let _ = tx.send((p, out, Instant::now()));
        });
    }
    drop(tx);
    let mut reports = Vec::new();
    for _ in 0..PROXIES {
        let (p, out, done) = rx
            .recv_timeout(Duration::from_secs(300))
            .expect("a proxy did not finish");
        assert!(
            out.status.success(),
            "proxy {p} failed ({}):\n{}\n{}",
            out.status,
            stdout_text(&out),
            String::from_utf8_lossy(&out.stderr)
        );
        reports.push((p, parse(&stdout_text(&out)), done));
    }
    let secs = reports
        .iter()
        .map(|r| r.2 - t0)
        .max()
        .unwrap()
        .as_secs_f64();
    let server_rss = server.peak_rss_bytes();

    // Every disk, every byte.
    for (p, report, _) in &reports {
        assert_eq!(report.sums.len(), DISKS_PER_PROXY, "proxy {p}");
        for i in 0..DISKS_PER_PROXY {
            let d = p * DISKS_PER_PROXY + i;
            let (name, sum, read) = report
                .sums
                .iter()
                .find(|s| s.0 == ScaleStore::export_name(d))
                .unwrap_or_else(|| panic!("proxy {p} did not report disk {d}"));
            assert_eq!(*sum, expected[d], "proxy {p}: {name} read wrong");
            if *p < PROXIES / 2 {
                assert_eq!(*read, DISK_BYTES, "proxy {p}: {name} read in full");
            } else {
                // Only the allocated chunks, which hold at least the data.
                let data = store.data_bytes(d);
                assert!(
                    *read >= data && *read < DISK_BYTES / 4,
                    "proxy {p}: {name}: {read} bytes read of {data} bytes of data"
                );
            }
        }
    }
    let largest = reports.iter().map(|r| r.1.rss).max().unwrap();
    let total = (DISKS as u64 * DISK_BYTES) as f64 / MIB as f64;
    let sum_of_rates: f64 = reports.iter().map(|r| r.1.mib_s).sum();
    println!(
        "remote_scale: {PROXIES} proxies x {DISKS_PER_PROXY} disks of 64 MiB through the C API's \
         nbd transport in {secs:.2} s: {:.0} MiB/s aggregate (the proxies' own rates add up to \
         {sum_of_rates:.0} MiB/s); peak RSS: server {:.1} MiB, largest proxy {:.1} MiB",
        total / secs,
        server_rss as f64 / MIB as f64,
        largest as f64 / MIB as f64
    );
    assert!(
        server_rss < MAX_SERVER_RSS,
        "the server's peak RSS was {server_rss} bytes (limit {MAX_SERVER_RSS})"
    );
    assert!(
        largest < MAX_PROXY_RSS,
        "a proxy's peak RSS was {largest} bytes (limit {MAX_PROXY_RSS})"
    );
    assert!(server.stop().success(), "vdisk-nbd did not stop cleanly");
}
