//! What stopping `vdisk-nbd` leaves behind.
//!
//! * **SIGTERM** (`sigterm_drains_flushes_and_closes_every_disk`): with writes in
//!   flight on a persistent export and a non-persistent one, the server finishes
//!   the requests it took (each gets its reply), flushes and closes the disks and
//!   exits 0. The persistent disk then checks clean (`vdisk::ops::check`: no
//!   finding, the unclean-shutdown flag cleared) and holds every acknowledged
//!   write; the non-persistent export's files are byte-identical to before.
//! * **SIGKILL** (`sigkill_loses_no_acknowledged_write`): a client writes through
//!   NBD - some writes with FUA, a FLUSH every few writes - and the server is
//!   killed with SIGKILL at a seeded random moment, again and again on the same
//!   persistent disk. Each write fills a 64 KiB slot never written before, every
//!   512-byte sector tagged with the write and its own address. After each kill
//!   `check` may find only repairable problems, and repair must make the disk
//!   clean; then every write made durable (its FUA reply, or a FLUSH reply after
//!   its reply) must read back whole, a write sent but not made durable may hold
//!   any mix of its sectors and zeros, and nothing else may have changed. A
//!   non-persistent export killed the same way leaves its files byte-identical.
//!
//! `VDISK_KILL_ITERATIONS=N` (default 8) kills, `VDISK_KILL_SEED=S` the seed (as
//! in `crash_kill.rs`); `--nocapture` prints the figures.

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vdisk::ops::check::check;
use vdisk::{create, CreateOptions, DiskType, OpenOptions};
use vdisk_interop::{env_u64, sha256_file, tempdir, NbdServer, SplitMix, MIB};
use vdisk_nbd::testing::{Client, Handshake};
use vdisk_nbd::wire::{self, cflag, cmd};

const SECTOR: u64 = 512;
const SLOT: u64 = 64 << 10;
const SIZE: u64 = 256 * MIB;

/// A sector of write `tag` at sector address `lba`.
fn sector(tag: u64, lba: u64) -> Vec<u8> {
    let mut s = vec![0u8; SECTOR as usize];
    s[0..8].copy_from_slice(&tag.to_le_bytes());
    s[8..16].copy_from_slice(&lba.to_le_bytes());
    for (i, b) in s[16..].iter_mut().enumerate() {
        *b = (tag as u8).wrapping_mul(31).wrapping_add(i as u8) | 1;
    }
    s
}

/// The data of write `tag` over `len` bytes at `offset`.
fn data(tag: u64, offset: u64, len: u64) -> Vec<u8> {
    (0..len / SECTOR)
        .flat_map(|i| sector(tag, offset / SECTOR + i))
        .collect()
}

fn session(sock: &Path) -> Client<UnixStream> {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut h = Handshake::start(s, wire::CLIENT_FIXED_NEWSTYLE | wire::CLIENT_NO_ZEROES).unwrap();
    assert!(h.structured_replies().unwrap());
    let info = h.go("disk", &[]).unwrap();
    h.into_client(info)
}

fn files_of(dir: &Path) -> BTreeMap<PathBuf, String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let h = sha256_file(&p);
            (p, h)
        })
        .collect()
}

fn new_disk(p: &Path) {
    create(p, &CreateOptions::new(DiskType::MonolithicSparse, SIZE)).unwrap();
}

/// A write of the model: its slot, length and whether it was made durable.
struct Write {
    tag: u64,
    offset: u64,
    len: u64,
    durable: bool,
}

/// Every write's slot against the model (see the module doc).
fn verify(disk: &Path, writes: &[Write], ctx: &str) {
    let d = OpenOptions::new().open(disk).unwrap();
    for w in writes {
        let mut got = vec![0u8; w.len as usize];
        d.read_at(&mut got, w.offset).unwrap();
        let want = data(w.tag, w.offset, w.len);
        if w.durable {
            assert!(
                got == want,
                "{ctx}: durable write {:#x} of {} bytes at {} was lost",
                w.tag,
                w.len,
                w.offset
            );
            continue;
        }
        for (i, (g, e)) in got
            .chunks(SECTOR as usize)
            .zip(want.chunks(SECTOR as usize))
            .enumerate()
        {
            assert!(
                g == e || g.iter().all(|&b| b == 0),
                "{ctx}: sector {i} of write {:#x} at {} holds neither its data nor zeros",
                w.tag,
                w.offset
            );
        }
    }
    // Beyond the slots written: nothing.
    let mut tail = vec![0u8; (4 * SLOT) as usize];
    d.read_at(&mut tail, SIZE - 4 * SLOT).unwrap();
    assert!(
        tail.iter().all(|&b| b == 0),
        "{ctx}: the last slots changed"
    );
}

#[test]
fn sigterm_drains_flushes_and_closes_every_disk() {
    let dir = tempdir();
    let persistent = dir.path().join("p");
    let throwaway = dir.path().join("n");
    std::fs::create_dir_all(&persistent).unwrap();
    std::fs::create_dir_all(&throwaway).unwrap();
    let pdisk = persistent.join("disk.vmdk");
    let ndisk = throwaway.join("disk.vmdk");
    new_disk(&pdisk);
    new_disk(&ndisk);
    let before = files_of(&throwaway);
    let p = NbdServer::start(&[
        "--persistent".to_string(),
        format!("--export=disk={}", pdisk.display()),
    ]);
    let n = NbdServer::start(&[format!("--export=disk={}", ndisk.display())]);
    let mut acked: Vec<Write> = Vec::new();
    for (server, is_persistent) in [(&p, true), (&n, false)] {
        let mut c = session(&server.socket);
        // Writes in flight when SIGTERM comes.
        let mut sent = BTreeMap::new();
        for i in 0..64u64 {
            let offset = i * SLOT;
            let tag = 0x7e57_0000 + i;
            let r = c
                .send(
                    cmd::WRITE,
                    if i % 4 == 0 { cflag::FUA } else { 0 },
                    offset,
                    SLOT,
                    &data(tag, offset, SLOT),
                )
                .unwrap();
            sent.insert(r.cookie, (tag, offset));
        }
        server.terminate_now();
        loop {
            match c.reply() {
                Ok(r) => {
                    assert_eq!(r.error, 0, "a write in flight at SIGTERM: {}", r.message);
                    let (tag, offset) = sent[&r.request.cookie];
                    if is_persistent {
                        acked.push(Write {
                            tag,
                            offset,
                            len: SLOT,
                            durable: true,
                        });
                    }
                }
                Err(e) if e.is_closed() => break,
                Err(e) => panic!("after SIGTERM: {e}"),
            }
        }
    }
    let (ps, ns) = (p.wait(), n.wait());
    assert!(ps.success() && ns.success(), "exit statuses {ps}, {ns}");
    let r = check(&pdisk, false).unwrap();
    assert!(r.is_clean(), "after SIGTERM the disk needs repair: {r:?}");
    verify(&pdisk, &acked, "after SIGTERM");
    assert_eq!(
        files_of(&throwaway),
        before,
        "a non-persistent export changed its files"
    );
    eprintln!(
        "SIGTERM: {} acknowledged writes in flight kept, disk clean",
        acked.len()
    );
}

#[test]
fn sigkill_loses_no_acknowledged_write() {
    let iterations = env_u64("VDISK_KILL_ITERATIONS").unwrap_or(8);
    let seed = env_u64("VDISK_KILL_SEED").unwrap_or(0x5eed_c0de);
    let mut rng = SplitMix(seed ^ 0x0b0d_0000);
    let dir = tempdir();
    let disk = dir.path().join("disk.vmdk");
    new_disk(&disk);
    let side = dir.path().join("np");
    std::fs::create_dir_all(&side).unwrap();
    let ndisk = side.join("disk.vmdk");
    new_disk(&ndisk);
    // Slots in a seeded order, each written once (the last four never).
    let slots = SIZE / SLOT - 4;
    let mut order: Vec<u64> = (0..slots).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut next_slot = 0usize;
    let mut writes: Vec<Write> = Vec::new();
    let (mut durable, mut sent, mut repairs) = (0, 0, 0);
    let start = Instant::now();
    for iter in 0..iterations {
        let ctx = format!("kill {iter} (VDISK_KILL_SEED={seed:#x})");
        let persistent = iter % 4 != 3;
        let before = files_of(&side);
        let server = if persistent {
            NbdServer::start(&[
                "--persistent".to_string(),
                format!("--export=disk={}", disk.display()),
            ])
        } else {
            NbdServer::start(&[format!("--export=disk={}", ndisk.display())])
        };
        let mut c = session(&server.socket);
        let killed = Arc::new(AtomicBool::new(false));
        let delay = Duration::from_millis(5 + rng.below(150));
        let killer = {
            let killed = Arc::clone(&killed);
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                killed.store(true, Ordering::SeqCst);
                server.kill()
            })
        };
        // Writes until the connection dies; the model learns what was durable.
        let first = writes.len();
        let mut unflushed: Vec<usize> = Vec::new();
        let mut i = 0u64;
        loop {
            if next_slot >= order.len() {
                break;
            }
            if i % 5 == 4 {
                match c.flush() {
                    Ok(0) => {
                        for &w in &unflushed {
                            writes[w].durable = persistent;
                        }
                        unflushed.clear();
                    }
                    Ok(e) => panic!("{ctx}: FLUSH failed with {e}"),
                    Err(_) => break,
                }
            }
            let offset = order[next_slot] * SLOT;
            next_slot += 1;
            let len = (1 + rng.below(SLOT / SECTOR)) * SECTOR;
            let tag = (iter << 32) | i;
            let fua = rng.below(3) == 0;
            let flags = if fua { cflag::FUA } else { 0 };
            if persistent {
                writes.push(Write {
                    tag,
                    offset,
                    len,
                    durable: false,
                });
            }
            sent += 1;
            match c.write(offset, &data(tag, offset, len), flags) {
                Ok(0) if persistent => {
                    let w = writes.len() - 1;
                    if fua {
                        writes[w].durable = true;
                    } else {
                        unflushed.push(w);
                    }
                }
                Ok(0) => {}
                Ok(e) => panic!("{ctx}: a write failed with {e}"),
                Err(_) => break,
            }
            i += 1;
        }
        let status = killer.join().unwrap();
        assert!(killed.load(Ordering::SeqCst));
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "{ctx}: {status}"
        );
        if !persistent {
            assert_eq!(
                files_of(&side),
                before,
                "{ctx}: a killed non-persistent export changed its files"
            );
            continue;
        }
        durable += writes[first..].iter().filter(|w| w.durable).count();
        let r = check(&disk, false).unwrap_or_else(|e| panic!("{ctx}: check: {e}"));
        if !r.is_clean() {
            assert!(
                r.all_repairable(),
                "{ctx}: problems repair cannot fix: {r:?}"
            );
            let fixed = check(&disk, true).unwrap_or_else(|e| panic!("{ctx}: repair: {e}"));
            assert!(fixed.all_repairable(), "{ctx}: {fixed:?}");
            let again = check(&disk, false).unwrap();
            assert!(
                again.is_clean(),
                "{ctx}: still not clean after repair: {again:?}"
            );
            repairs += 1;
        }
        verify(&disk, &writes, &ctx);
    }
    eprintln!(
        "SIGKILL: {iterations} kills in {:.1?}: {sent} writes sent, {durable} made durable and \
         found whole, {repairs} repairs (the unclean flag and what it covers)",
        start.elapsed()
    );
}
