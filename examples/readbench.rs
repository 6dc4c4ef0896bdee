//! `vdisk-readbench DISK [BLOCK_SECTORS]`: reads a whole disk sequentially through the
//! Rust API in blocks of BLOCK_SECTORS sectors (default 2048 = 1 MiB), like the C
//! sample's `-readbench`, and prints the throughput in the same parseable form:
//! `readbench: <bytes> bytes in <seconds> s: <MiB/s> MiB/s`.

use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: vdisk-readbench DISK [BLOCK_SECTORS]");
        return ExitCode::FAILURE;
    };
    let sectors: usize = match args.get(2).map(|s| s.parse()) {
        None => 2048,
        Some(Ok(n)) if n > 0 => n,
        _ => {
            eprintln!("vdisk-readbench: BLOCK_SECTORS must be a positive number");
            return ExitCode::FAILURE;
        }
    };
    let disk = match vdisk::Disk::open(path) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("vdisk-readbench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut buf = vec![0u8; sectors * 512];
    let cap = disk.capacity();
    let start = Instant::now();
    let mut off = 0u64;
    while off < cap {
        let n = (cap - off).min(buf.len() as u64) as usize;
        if let Err(e) = disk.read_at(&mut buf[..n], off) {
            eprintln!("vdisk-readbench: {e}");
            return ExitCode::FAILURE;
        }
        off += n as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "readbench: {cap} bytes in {secs:.3} s: {:.1} MiB/s",
        cap as f64 / (1024.0 * 1024.0) / secs.max(1e-9)
    );
    ExitCode::SUCCESS
}
