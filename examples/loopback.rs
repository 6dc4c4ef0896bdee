//! The ceiling of a network reader on this machine: how fast the bytes of a file
//! (warm in the page cache) cross a loopback socket at best, against reading them
//! with `pread`. The sender moves them with `sendfile` 1 MiB at a time, as
//! vdisk-nbd does, and the receiver reads them into one 1 MiB
//! buffer, as a client does; no protocol at all. Whatever an NBD client reaches
//! over that socket, relative to the local read, is at most the ratio printed
//! (for bytes that are all data: holes cross as a few header bytes).
//!
//! usage: vdisk-loopback FILE [MiB] [rounds]

use std::fs::File;
use std::io::{self, Read};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Reads `len` bytes of `file` with pread, 1 MiB at a time.
fn local(file: &File, len: u64) -> io::Result<Duration> {
    let mut buf = vec![0u8; MIB as usize];
    let t = Instant::now();
    let mut at = 0;
    while at < len {
        let n = (len - at).min(MIB) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        at += n as u64;
    }
    Ok(t.elapsed())
}

/// Sends `len` bytes of `path` over `tx` from another thread while this one
/// reads them from `rx`.
fn over<W, R>(path: &str, len: u64, tx: W, mut rx: R) -> io::Result<Duration>
where
    W: AsFd + Send + 'static,
    R: Read,
{
    let file = File::open(path)?;
    let t = Instant::now();
    let sender = std::thread::spawn(move || -> io::Result<u64> {
        let mut at = 0i64;
        let end = i64::try_from(len).map_err(io::Error::other)?;
        while at < end {
            let n = (end - at).min(MIB as i64) as usize;
            match nix::sys::sendfile::sendfile(&tx, &file, Some(&mut at), n) {
                Ok(0) => break,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(at as u64)
    });
    let mut buf = vec![0u8; MIB as usize];
    let mut got = 0u64;
    while got < len {
        match rx.read(&mut buf)? {
            0 => break,
            n => got += n as u64,
        }
    }
    let elapsed = t.elapsed();
    let sent = sender
        .join()
        .map_err(|_| io::Error::other("the sender panicked"))??;
    if got != len || sent != len {
        return Err(io::Error::other(format!(
            "sent {sent}, received {got} of {len}"
        )));
    }
    Ok(elapsed)
}

fn tcp(path: &str, len: u64) -> io::Result<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let rx = TcpStream::connect(listener.local_addr()?)?;
    let (tx, _) = listener.accept()?;
    tx.set_nodelay(true)?;
    over(path, len, tx, rx)
}

fn unix(path: &str, len: u64) -> io::Result<Duration> {
    let (tx, rx) = UnixStream::pair()?;
    // vdisk-nbd's send buffer on Unix sockets.
    nix::sys::socket::setsockopt(&tx, nix::sys::socket::sockopt::SndBuf, &(1 << 20))?;
    over(path, len, tx, rx)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: vdisk-loopback FILE [MiB] [rounds]");
        std::process::exit(2);
    };
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let len = match args.get(2) {
        Some(m) => m.parse::<u64>().map_err(io::Error::other)? * MIB,
        None => size,
    }
    .min(size);
    let rounds: usize = match args.get(3) {
        Some(r) => r.parse().map_err(io::Error::other)?,
        None => 5,
    };
    local(&file, len)?; // warm the page cache
    let (mut l, mut u, mut t) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        l.push(local(&file, len)?);
        u.push(unix(path, len)?);
        t.push(tcp(path, len)?);
    }
    let rate = |d: Duration| len as f64 / MIB as f64 / d.as_secs_f64();
    let (l, u, t) = (median(l), median(u), median(t));
    println!("loopback ceiling, {} MiB, median of {rounds}:", len / MIB);
    println!("  pread                     {:8.0} MiB/s", rate(l));
    println!(
        "  sendfile over Unix socket {:8.0} MiB/s = {:.2}x of pread",
        rate(u),
        l.as_secs_f64() / u.as_secs_f64()
    );
    println!(
        "  sendfile over TCP         {:8.0} MiB/s = {:.2}x of pread",
        rate(t),
        l.as_secs_f64() / t.as_secs_f64()
    );
    Ok(())
}
