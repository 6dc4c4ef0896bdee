//! `vdisk-proxy`: a backup proxy in miniature, through libvixDiskLib's C API (the
//! `extern "C"` functions `libvixDiskLib.so` exports, called as a C program calls
//! them). One connection - local files, or a remote server over the `nbd`/`nbdssl`
//! transports - and every disk named opened on it and read at once, a thread per
//! disk, each keeping several `VixDiskLib_ReadAsync` requests in flight and
//! checksumming what comes back in disk order.
//!
//! ```text
//! vdisk-proxy [OPTIONS] DISK...
//!   --server NAME     ConnectEx serverName: a host, unix:PATH or an NBD URI
//!                     (without it the DISKs are local files)
//!   --port N          ConnectEx port (the NBD port; default 10809)
//!   --thumbprint T    ConnectEx thumbPrint (pins the server certificate, forces TLS)
//!   --modes M         ConnectEx transportModes (default: the library's order)
//!   --in-flight N     ReadAsync requests in flight per disk (default 8)
//!   --block N         sectors per request (default 2048: 1 MiB)
//!   --allocated       QueryAllocatedBlocks first (chunks of 128 sectors), then read
//!                     only the allocated chunks, as backup software does
//!   --query-only      only QueryAllocatedBlocks, timed (--repeat times)
//!   --repeat N        QueryAllocatedBlocks runs (default 1; the median is reported)
//!   --check sha256|none   checksum the disk (default sha256)
//! ```
//!
//! With `--server`, a DISK is the export name (`[datastore1] vm/vm.vmdk`). Output,
//! one line per disk, then a summary:
//!
//! ```text
//! disk SHA256 BYTES_READ NAME            (SHA256 of the whole disk; "-" with --check none)
//! allocated MILLISECONDS BLOCKS BYTES NAME   (with --allocated or --query-only)
//! proxy: D disks, V bytes (R read) in S s: X MiB/s, peak RSS N KiB
//! ```
//!
//! With `--allocated` the checksum still covers the whole disk: what was not read
//! (unallocated) counts as zeros. X is the disks' virtual size over the wall time
//! from the first Open to the last Close. A failure prints the VixError and its
//! text on stderr and exits with status 1.

use std::ffi::{c_char, c_void, CStr, CString};
use std::process::ExitCode;
use std::ptr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use sha2::{Digest, Sha256};
use vixDiskLib::api_io::{
    VixDiskLib_Close, VixDiskLib_FreeBlockList, VixDiskLib_FreeInfo, VixDiskLib_GetInfo,
    VixDiskLib_Open, VixDiskLib_QueryAllocatedBlocks, VixDiskLib_ReadAsync, VixDiskLib_Wait,
};
use vixDiskLib::api_lib::{
    VixDiskLib_ConnectEx, VixDiskLib_Disconnect, VixDiskLib_Exit, VixDiskLib_FreeErrorText,
    VixDiskLib_GetErrorText, VixDiskLib_InitEx,
};
use vixDiskLib::errors::{VIX_ASYNC, VIX_OK};
use vixDiskLib::types::{
    VixDiskLibBlock, VixDiskLibBlockList, VixDiskLibConnectParams, VixDiskLibConnection,
    VixDiskLibHandle, VixDiskLibInfo, VixError, VIXDISKLIB_FLAG_OPEN_READ_ONLY,
};

const SECTOR: u64 = 512;
/// QueryAllocatedBlocks' chunk (VDDK's smallest).
const CHUNK: u64 = 128;
/// Most chunks per QueryAllocatedBlocks call (VIXDISKLIB_MAX_CHUNK_NUMBER).
const MAX_CHUNKS: u64 = 512 * 1024;

#[derive(Clone)]
struct Args {
    server: Option<String>,
    port: u32,
    thumbprint: Option<String>,
    modes: Option<String>,
    in_flight: usize,
    block: u64,
    allocated: bool,
    query_only: bool,
    repeat: usize,
    sha256: bool,
    disks: Vec<String>,
}

const USAGE: &str = "usage: vdisk-proxy [--server NAME] [--port N] [--thumbprint T] [--modes M] \
                     [--in-flight N] [--block SECTORS] [--allocated] [--query-only] [--repeat N] \
                     [--check sha256|none] DISK...";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        server: None,
        port: 0,
        thumbprint: None,
        modes: None,
        in_flight: 8,
        block: 2048,
        allocated: false,
        query_only: false,
        repeat: 1,
        sha256: true,
        disks: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    let number = |v: Option<String>, what: &str| -> Result<u64, String> {
        v.and_then(|v| v.parse().ok())
            .filter(|&n: &u64| n > 0)
            .ok_or_else(|| format!("{what} takes a positive number"))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--server" => a.server = Some(it.next().ok_or("--server takes a name")?),
            "--port" => a.port = number(it.next(), "--port")? as u32,
            "--thumbprint" => a.thumbprint = Some(it.next().ok_or("--thumbprint takes a value")?),
            "--modes" => a.modes = Some(it.next().ok_or("--modes takes a list")?),
            "--in-flight" => a.in_flight = number(it.next(), "--in-flight")? as usize,
            "--block" => a.block = number(it.next(), "--block")?,
            "--allocated" => a.allocated = true,
            "--query-only" => a.query_only = true,
            "--repeat" => a.repeat = number(it.next(), "--repeat")? as usize,
            "--check" => {
                a.sha256 = match it.next().as_deref() {
                    Some("sha256") => true,
                    Some("none") => false,
                    _ => return Err("--check takes sha256 or none".into()),
                }
            }
            "-h" | "--help" => return Err(USAGE.into()),
            s if s.starts_with("--") => return Err(format!("unknown option {s}\n{USAGE}")),
            _ => a.disks.push(arg),
        }
    }
    if a.disks.is_empty() {
        return Err(USAGE.into());
    }
    Ok(a)
}

/// A VixError and what the library says about it.
struct Failure {
    code: VixError,
    what: String,
}

impl Failure {
    fn new(code: VixError, what: impl Into<String>) -> Failure {
        Failure {
            code,
            what: what.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // SAFETY: any code is accepted; NULL locale.
        let text = unsafe { VixDiskLib_GetErrorText(self.code, ptr::null()) };
        let s = if text.is_null() {
            String::new()
        } else {
            // SAFETY: a NUL-terminated string from the library, freed below.
            let s = unsafe { CStr::from_ptr(text) }
                .to_string_lossy()
                .into_owned();
            // SAFETY: from GetErrorText.
            unsafe { VixDiskLib_FreeErrorText(text) };
            s
        };
        write!(f, "{} failed: VixError {}: {s}", self.what, self.code)
    }
}

fn check(code: VixError, what: &str) -> Result<(), Failure> {
    if code == VIX_OK {
        Ok(())
    } else {
        Err(Failure::new(code, what))
    }
}

/// The connection (a pointer the library made; shared by the disk threads, as
/// VDDK allows).
#[derive(Clone, Copy)]
struct Conn(VixDiskLibConnection);
// SAFETY: a connection handle may be used from any thread (the library locks its
// state).
unsafe impl Send for Conn {}
// SAFETY: as above.
unsafe impl Sync for Conn {}

fn connect(a: &Args) -> Result<Conn, Failure> {
    let server = a.server.as_deref().map(|s| CString::new(s).unwrap());
    let thumb = a.thumbprint.as_deref().map(|s| CString::new(s).unwrap());
    let modes = a.modes.as_deref().map(|s| CString::new(s).unwrap());
    let mut conn: VixDiskLibConnection = ptr::null_mut();
    // SAFETY: all-zero is a valid (empty) parameter struct.
    let mut params: VixDiskLibConnectParams = unsafe { std::mem::zeroed() };
    let code = if let Some(server) = &server {
        params.serverName = server.as_ptr() as *mut c_char;
        params.port = a.port;
        if let Some(t) = &thumb {
            params.thumbPrint = t.as_ptr() as *mut c_char;
        }
        // SAFETY: the parameters and strings outlive the call; a valid out pointer.
        unsafe {
            VixDiskLib_ConnectEx(
                &params,
                1,
                ptr::null(),
                modes.as_ref().map_or(ptr::null(), |m| m.as_ptr()),
                &mut conn,
            )
        }
    } else {
        // SAFETY: NULL parameters: local files; a valid out pointer.
        unsafe { VixDiskLib_ConnectEx(ptr::null(), 1, ptr::null(), ptr::null(), &mut conn) }
    };
    check(code, "VixDiskLib_ConnectEx")?;
    Ok(Conn(conn))
}

/// Requests in flight on one disk: a slot per buffer, completed by the callback.
struct Ring {
    done: Mutex<Vec<Option<VixError>>>,
    cond: Condvar,
}

/// What a callback gets: its ring and slot.
struct SlotRef {
    ring: Arc<Ring>,
    slot: usize,
}

unsafe extern "C" fn on_read(data: *mut c_void, result: VixError) {
    // SAFETY: `data` is a SlotRef that lives until the disk's Wait returned.
    let s = unsafe { &*(data as *const SlotRef) };
    let mut done = s.ring.done.lock().unwrap_or_else(|p| p.into_inner());
    done[s.slot] = Some(result);
    s.ring.cond.notify_all();
}

/// The checksum of the whole disk, in order; gaps count as zeros.
struct Check {
    sha: Option<Sha256>,
    at: u64,
    zeros: Vec<u8>,
}

impl Check {
    fn new(on: bool) -> Check {
        Check {
            sha: on.then(Sha256::new),
            at: 0,
            zeros: if on { vec![0u8; 1 << 20] } else { Vec::new() },
        }
    }

    fn zeros_to(&mut self, offset: u64) {
        if let Some(sha) = &mut self.sha {
            while self.at < offset {
                let n = (offset - self.at).min(self.zeros.len() as u64) as usize;
                sha.update(&self.zeros[..n]);
                self.at += n as u64;
            }
        }
        self.at = self.at.max(offset);
    }

    fn data(&mut self, offset: u64, bytes: &[u8]) {
        self.zeros_to(offset);
        if let Some(sha) = &mut self.sha {
            sha.update(bytes);
        }
        self.at = offset + bytes.len() as u64;
    }

    fn finish(mut self, size: u64) -> String {
        self.zeros_to(size);
        match self.sha {
            Some(sha) => sha.finalize().iter().map(|b| format!("{b:02x}")).collect(),
            None => "-".into(),
        }
    }
}

struct Handle(VixDiskLibHandle);

impl Drop for Handle {
    fn drop(&mut self) {
        let code = VixDiskLib_Close(self.0);
        if code != VIX_OK {
            eprintln!("vdisk-proxy: {}", Failure::new(code, "VixDiskLib_Close"));
        }
    }
}

fn capacity(h: VixDiskLibHandle) -> Result<u64, Failure> {
    let mut info: *mut VixDiskLibInfo = ptr::null_mut();
    // SAFETY: an open handle, a valid out pointer.
    let code = unsafe { VixDiskLib_GetInfo(h, &mut info) };
    check(code, "VixDiskLib_GetInfo")?;
    // SAFETY: GetInfo succeeded: `info` is valid until FreeInfo.
    let sectors = unsafe { (*info).capacity };
    // SAFETY: from GetInfo.
    unsafe { VixDiskLib_FreeInfo(info) };
    Ok(sectors)
}

/// The allocated chunks of the disk (sector ranges), whole calls of at most
/// MAX_CHUNKS chunks; the unaligned tail counts as allocated.
fn allocated(h: VixDiskLibHandle, sectors: u64) -> Result<Vec<(u64, u64)>, Failure> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut at = 0;
    let whole = sectors / CHUNK * CHUNK;
    while at < whole {
        let n = ((whole - at) / CHUNK).min(MAX_CHUNKS) * CHUNK;
        let mut list: *mut VixDiskLibBlockList = ptr::null_mut();
        // SAFETY: an open handle, a valid out pointer.
        let code = unsafe { VixDiskLib_QueryAllocatedBlocks(h, at, n, CHUNK, &mut list) };
        check(code, "VixDiskLib_QueryAllocatedBlocks")?;
        // SAFETY: a list from the library: `numBlocks` entries from `blocks` on.
        unsafe {
            let first = ptr::addr_of!((*list).blocks).cast::<VixDiskLibBlock>();
            for i in 0..(*list).numBlocks as usize {
                let b = &*first.add(i);
                out.push((b.offset, b.length));
            }
            VixDiskLib_FreeBlockList(list);
        }
        at += n;
    }
    if whole < sectors {
        out.push((whole, sectors - whole));
    }
    Ok(out)
}

/// What one disk gave.
struct DiskResult {
    sum: String,
    read: u64,
    size: u64,
    /// (milliseconds of QueryAllocatedBlocks, blocks, bytes).
    query: Option<(f64, usize, u64)>,
}

/// Reads `ranges` (sectors) of the open disk with `in_flight` requests of at most
/// `block` sectors in flight, checksumming in order.
fn read_ranges(
    h: VixDiskLibHandle,
    ranges: &[(u64, u64)],
    a: &Args,
    check_sum: &mut Check,
) -> Result<u64, Failure> {
    let block = a.block;
    let n = a.in_flight;
    let block_bytes = (block * SECTOR) as usize;
    let mut pool = vec![0u8; n * block_bytes];
    let base = pool.as_mut_ptr();
    let ring = Arc::new(Ring {
        done: Mutex::new(vec![None; n]),
        cond: Condvar::new(),
    });
    let slots: Vec<Box<SlotRef>> = (0..n)
        .map(|slot| {
            Box::new(SlotRef {
                ring: Arc::clone(&ring),
                slot,
            })
        })
        .collect();
    let pieces = ranges.iter().flat_map(|&(start, len)| {
        (0..len.div_ceil(block)).map(move |i| (start + i * block, block.min(len - i * block)))
    });
    // Submitted, in order: (slot, sector, sectors).
    let mut queue = std::collections::VecDeque::new();
    let mut read = 0u64;
    let mut first_error: Option<Failure> = None;
    let mut next_slot = 0;
    let mut pieces = pieces.peekable();
    loop {
        while first_error.is_none() && queue.len() < n {
            let Some((sector, count)) = pieces.next() else {
                break;
            };
            let slot = next_slot;
            next_slot = (next_slot + 1) % n;
            ring.done.lock().unwrap()[slot] = None;
            let data = &*slots[slot] as *const SlotRef as *mut c_void;
            // SAFETY: the slot's buffer holds `block` sectors and is not touched
            // until its callback ran; the SlotRef outlives the Wait below.
            let code = unsafe {
                VixDiskLib_ReadAsync(
                    h,
                    sector,
                    count,
                    base.add(slot * block_bytes),
                    Some(on_read),
                    data,
                )
            };
            if code != VIX_ASYNC {
                first_error = Some(Failure::new(
                    code,
                    format!("VixDiskLib_ReadAsync of sectors {sector}+{count}"),
                ));
                break;
            }
            queue.push_back((slot, sector, count));
        }
        let Some((slot, sector, count)) = queue.pop_front() else {
            break;
        };
        let code = {
            let mut done = ring.done.lock().unwrap();
            loop {
                if let Some(c) = done[slot] {
                    break c;
                }
                done = ring.cond.wait(done).unwrap();
            }
        };
        if code != VIX_OK {
            first_error.get_or_insert(Failure::new(
                code,
                format!("VixDiskLib_ReadAsync of sectors {sector}+{count}"),
            ));
            continue;
        }
        let len = (count * SECTOR) as usize;
        // SAFETY: the slot's request completed (its callback ran, under the ring's
        // lock): the library no longer writes its buffer.
        let bytes = unsafe { std::slice::from_raw_parts(base.add(slot * block_bytes), len) };
        check_sum.data(sector * SECTOR, bytes);
        read += len as u64;
    }
    // Every callback ran (each was awaited above); Wait as VDDK's clients do.
    let waited = VixDiskLib_Wait(h);
    drop(pool);
    if let Some(e) = first_error {
        return Err(e);
    }
    check(waited, "VixDiskLib_Wait")?;
    Ok(read)
}

fn one_disk(conn: Conn, name: &str, a: &Args) -> Result<DiskResult, Failure> {
    let path = CString::new(name).unwrap();
    let mut h: VixDiskLibHandle = ptr::null_mut();
    let flags = VIXDISKLIB_FLAG_OPEN_READ_ONLY;
    // SAFETY: a live connection, a NUL-terminated path, a valid out pointer.
    let code = unsafe { VixDiskLib_Open(conn.0, path.as_ptr(), flags, &mut h) };
    check(code, &format!("VixDiskLib_Open of {name}"))?;
    let handle = Handle(h);
    let sectors = capacity(handle.0)?;
    let size = sectors * SECTOR;
    let mut query = None;
    let ranges = if a.allocated || a.query_only {
        let mut times = Vec::new();
        let mut blocks = Vec::new();
        for _ in 0..a.repeat.max(1) {
            let t0 = Instant::now();
            blocks = allocated(handle.0, sectors)?;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        let ms = times[times.len() / 2];
        let bytes = blocks.iter().map(|b| b.1 * SECTOR).sum();
        query = Some((ms, blocks.len(), bytes));
        blocks
    } else {
        vec![(0, sectors)]
    };
    if a.query_only {
        return Ok(DiskResult {
            sum: "-".into(),
            read: 0,
            size,
            query,
        });
    }
    let mut sum = Check::new(a.sha256);
    let read = read_ranges(handle.0, &ranges, a, &mut sum)?;
    drop(handle);
    Ok(DiskResult {
        sum: sum.finish(size),
        read,
        size,
        query,
    })
}

/// This process's peak resident memory (`VmHWM`), in KiB (0 if unknown).
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> ExitCode {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // SAFETY: no callbacks (the library's defaults), no libDir or configFile.
    let code = unsafe {
        VixDiskLib_InitEx(
            8,
            0,
            ptr::null_mut(),
            ptr::null_mut(),
            ptr::null_mut(),
            ptr::null(),
            ptr::null(),
        )
    };
    if let Err(e) = check(code, "VixDiskLib_InitEx") {
        eprintln!("vdisk-proxy: {e}");
        return ExitCode::FAILURE;
    }
    let conn = match connect(&a) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vdisk-proxy: {e}");
            VixDiskLib_Exit();
            return ExitCode::FAILURE;
        }
    };
    let t0 = Instant::now();
    let results: Vec<(String, Result<DiskResult, Failure>)> = std::thread::scope(|s| {
        let threads: Vec<_> = a
            .disks
            .iter()
            .map(|name| {
                let a = &a;
                s.spawn(move || (name.clone(), one_disk(conn, name, a)))
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("a disk thread panicked"))
            .collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    let mut failed = false;
    let (mut size, mut read) = (0u64, 0u64);
    for (name, r) in &results {
        match r {
            Ok(d) => {
                if let Some((ms, blocks, bytes)) = d.query {
                    println!("allocated {ms:.3} {blocks} {bytes} {name}");
                }
                if !a.query_only {
                    println!("disk {} {} {name}", d.sum, d.read);
                }
                size += d.size;
                read += d.read;
            }
            Err(e) => {
                eprintln!("vdisk-proxy: {name}: {e}");
                failed = true;
            }
        }
    }
    // Every handle is closed.
    let code = VixDiskLib_Disconnect(conn.0);
    if let Err(e) = check(code, "VixDiskLib_Disconnect") {
        eprintln!("vdisk-proxy: {e}");
        failed = true;
    }
    VixDiskLib_Exit();
    if failed {
        return ExitCode::FAILURE;
    }
    println!(
        "proxy: {} disks, {size} bytes ({read} read) in {secs:.3} s: {:.1} MiB/s, peak RSS {} KiB",
        a.disks.len(),
        size as f64 / (1 << 20) as f64 / secs.max(1e-9),
        peak_rss_kib()
    );
    ExitCode::SUCCESS
}
