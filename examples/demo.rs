//! The main job, self-contained: create a disk, write a known pattern, flush, close,
//! reopen read-only, read it back and verify, then print the disk's info and its
//! allocation map. Later issues grow this into the whole backup flow.
//!
//! Run with `./run-demo.sh` (or `cargo run --release -p vdisk-examples --bin vdisk-demo [DIR]`).

use std::path::PathBuf;
use std::process::ExitCode;

use vdisk::{create, AdapterType, CreateOptions, Disk, DiskType, OpenOptions, RangeKind};

fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i) / 512 % 251) as u8 ^ 0x5a)
        .collect()
}

fn run() -> vdisk::Result<()> {
    let keep = std::env::args().nth(1).map(PathBuf::from);
    let tmp =
        tempfile::tempdir().map_err(|e| vdisk::Error::io("cannot make a temporary folder", e))?;
    let dir = keep.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)
        .map_err(|e| vdisk::Error::io("cannot make the output folder", e))?;
    let path = dir.join("demo.vmdk");
    let _ = std::fs::remove_file(&path);

    println!(
        "1. creating a 256 MiB monolithicSparse disk: {}",
        path.display()
    );
    let mut opts = CreateOptions::new(DiskType::MonolithicSparse, 256 << 20);
    opts.adapter = AdapterType::LsiLogic;
    create(&path, &opts)?;

    let writes: [(u64, usize); 4] = [
        (0, 1 << 20),
        (64 << 20, 300 << 10),
        ((200 << 20) + 512, 4096),
        ((256 << 20) - 512, 512),
    ];
    println!(
        "2. writing {} regions (aligned, unaligned, the last sector)",
        writes.len()
    );
    let disk = OpenOptions::new().write(true).open(&path)?;
    let cid_before = disk.cid()?;
    for &(off, len) in &writes {
        disk.write_at(&pattern(off, len), off)?;
    }
    disk.set_metadata("demo.note", "written by vdisk-demo")?;
    disk.close()?;

    println!("3. reopening read-only and verifying every byte written");
    let disk = Disk::open(&path)?;
    for &(off, len) in &writes {
        let mut buf = vec![0u8; len];
        disk.read_at(&mut buf, off)?;
        if buf != pattern(off, len) {
            return Err(vdisk::Error::new(
                vdisk::ErrorKind::Fail,
                format!("data mismatch at offset {off}"),
            ));
        }
    }
    let mut hole = vec![0xffu8; 4096];
    disk.read_at(&mut hole, 128 << 20)?;
    if hole.iter().any(|&b| b != 0) {
        return Err(vdisk::Error::new(
            vdisk::ErrorKind::Fail,
            "an unwritten range did not read as zeros",
        ));
    }
    println!(
        "   all {} regions read back identical; unwritten ranges read as zeros",
        writes.len()
    );

    let info = disk.info()?;
    println!("4. disk info");
    println!(
        "   type:       {}",
        info.disk_type.map_or("?", |t| t.name())
    );
    println!("   capacity:   {} bytes", info.capacity);
    println!(
        "   adapter:    {}",
        info.adapter_type.as_deref().unwrap_or("-")
    );
    if let Some(g) = info.geometry {
        println!(
            "   geometry:   {}/{}/{} (C/H/S)",
            g.cylinders, g.heads, g.sectors
        );
    }
    println!(
        "   CID:        {:08x} (was {cid_before:08x} before the first write)",
        info.cid.unwrap_or(0)
    );
    println!(
        "   allocated:  {} bytes of data, {} bytes on the host",
        info.allocated_bytes, info.file_bytes
    );
    println!("   note:       {}", disk.metadata("demo.note")?);
    println!("5. allocation map (data ranges)");
    for r in disk.allocation_map(0, disk.capacity())? {
        if r.kind == RangeKind::Data {
            println!(
                "   data at {:>10} .. {:>10} ({} bytes)",
                r.offset,
                r.offset + r.length,
                r.length
            );
        }
    }
    if keep.is_some() {
        println!("the disk is kept at {}", path.display());
    }
    println!("demo finished: OK");
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vdisk-demo: error: {e}");
            ExitCode::FAILURE
        }
    }
}
