//! `vdisk-nbd`: serves VMDK disks and snapshot chains over NBD (the name mirrors
//! `qemu-nbd`). Exports are independent non-persistent by default (writes go to a
//! throwaway redo log; the disk files never change), `-r` read-only, `--persistent`
//! write through. SIGTERM or SIGINT stop it in order: requests in flight finish,
//! disks are flushed and closed.
//!
//! TLS: `--tls-cert FILE --tls-key FILE` make TLS (`STARTTLS`) required, as
//! `qemu-nbd --tls-creds` does; `--tls=on` also lets plaintext clients in (nbdkit's
//! `--tls=on`), `--tls=off` turns it off. `--tls-ca FILE` requires client
//! certificates issued by that CA.

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use vdisk_nbd::limits::{self, Limits};
use vdisk_nbd::{Datastore, DiskExport, Exports, Mode, Server, TlsMode};

#[derive(Parser, Debug)]
#[command(
    name = "vdisk-nbd",
    version,
    about = "Serve VMDK disks and snapshot chains over NBD",
    after_help = "Exports: each DISK under its file name, --export NAME=DISK under NAME, and every disk below \
the folder of --datastore NAME=DIR as \"[NAME] folder/disk.vmdk\" (as VDDK names them).\n\
Metadata contexts: base:allocation, x-vdisk:allocation-depth, x-vdisk:changed:<change ID> (the areas \
written since that change ID, from the disk's change tracking; list x-vdisk:changed: for the current ID).\n\
TLS: --tls-cert and --tls-key make TLS required (as qemu-nbd --tls-creds); --tls=on also admits \
plaintext clients; --tls-ca requires client certificates issued by that CA (qemu clients send one).\n\
Examples:\n  vdisk-nbd --socket /tmp/nbd.sock disk.vmdk && nbdinfo --map 'nbd+unix:///disk.vmdk?socket=/tmp/nbd.sock'\n  \
vdisk-nbd -r --port 10809 --datastore datastore1=/vmfs/volumes/ds1\n  \
vdisk-nbd -r --tls-cert pki/server-cert.pem --tls-key pki/server-key.pem disk.vmdk && \
nbdinfo 'nbds://localhost/disk.vmdk?tls-certificates=pki'"
)]
struct Args {
    /// Read-only exports (writes are refused).
    #[arg(short = 'r', long = "read-only", conflicts_with = "persistent")]
    read_only: bool,
    /// Writes go to the disks (default: to a throwaway redo log per export).
    #[arg(long)]
    persistent: bool,
    /// Listen on this Unix socket instead of TCP.
    #[arg(long, conflicts_with_all = ["bind", "port"])]
    socket: Option<PathBuf>,
    /// TCP address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    bind: String,
    /// TCP port to listen on.
    #[arg(long, short = 'p', default_value_t = 10809)]
    port: u16,
    /// Export DISK under NAME (repeatable).
    #[arg(long = "export", value_name = "NAME=DISK")]
    exports: Vec<String>,
    /// Export every disk below DIR as "[NAME] relative/path.vmdk" (repeatable).
    #[arg(long = "datastore", value_name = "NAME=DIR")]
    datastores: Vec<String>,
    /// Server certificate for TLS (PEM; the chain, leaf first). With --tls-key,
    /// TLS is required unless --tls=on.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM: PKCS#8, RSA or EC).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require a client certificate issued by a CA of this PEM file.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// off: no TLS; on: TLS offered, plaintext allowed; require: TLS only (the
    /// default when --tls-cert is given, else off).
    #[arg(long, value_enum, value_name = "MODE")]
    tls: Option<TlsArg>,
    /// Most connections served at once (one more is closed before the greeting).
    #[arg(long, value_name = "N", default_value_t = limits::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Most connections to one export at once (one more is refused the export).
    #[arg(long, value_name = "N", default_value_t = limits::DEFAULT_MAX_CONNECTIONS_PER_EXPORT)]
    max_connections_per_export: usize,
    /// Seconds a client may take to negotiate before it is disconnected.
    #[arg(long, value_name = "SECS", value_parser = seconds,
          default_value_t = limits::DEFAULT_HANDSHAKE_TIMEOUT.as_secs_f64())]
    handshake_timeout: f64,
    /// Seconds a connection may stay silent, with no request in flight, before it
    /// is closed.
    #[arg(long, value_name = "SECS", value_parser = seconds,
          default_value_t = limits::DEFAULT_IDLE_TIMEOUT.as_secs_f64())]
    idle_timeout: f64,
    /// Seconds a reply may wait for a client that does not read before the
    /// connection is closed.
    #[arg(long, value_name = "SECS", value_parser = seconds,
          default_value_t = limits::DEFAULT_REPLY_TIMEOUT.as_secs_f64())]
    reply_timeout: f64,
    /// Log connections and refused requests to stderr (twice: every request).
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count)]
    verbose: u8,
    /// Disks to export under their file names.
    disks: Vec<PathBuf>,
}

/// A positive number of seconds (fractions allowed).
fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && Duration::try_from_secs_f64(v).is_ok() => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

/// The server limits the arguments set.
fn limits_of(a: &Args) -> Limits {
    let secs = |v: f64| Duration::try_from_secs_f64(v).unwrap_or(Duration::MAX);
    Limits {
        handshake_timeout: secs(a.handshake_timeout),
        idle_timeout: secs(a.idle_timeout),
        reply_timeout: secs(a.reply_timeout),
        max_connections: a.max_connections,
        max_connections_per_export: a.max_connections_per_export,
        ..Limits::default()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum TlsArg {
    Off,
    On,
    Require,
}

/// The TLS mode and acceptor the arguments ask for; certificate and key files are
/// read and checked here, so a bad one fails at startup.
fn tls(a: &Args) -> Result<(TlsMode, Option<vdisk_nbd::tls::Acceptor>), String> {
    let mode = match (a.tls, &a.tls_cert) {
        (Some(TlsArg::Off), _) | (None, None) => return Ok((TlsMode::Off, None)),
        (Some(TlsArg::On), Some(_)) => TlsMode::On,
        (Some(TlsArg::Require), Some(_)) | (None, Some(_)) => TlsMode::Require,
        (Some(m), None) => {
            return Err(format!(
                "--tls={} needs a certificate: --tls-cert FILE --tls-key FILE",
                if m == TlsArg::On { "on" } else { "require" }
            ))
        }
    };
    let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) else {
        return Err("--tls-cert and --tls-key go together".into());
    };
    let acceptor = vdisk_nbd::tls::Acceptor::from_files(cert, key, a.tls_ca.as_deref())
        .map_err(|e| format!("TLS: {e}"))?;
    Ok((mode, Some(acceptor)))
}

fn split_pair(s: &str, what: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((n, v)) if !n.is_empty() && !v.is_empty() => Ok((n.to_string(), v.to_string())),
        _ => Err(format!("{what} {s:?} is not NAME=VALUE")),
    }
}

fn exports(a: &Args) -> Result<Exports, String> {
    let mut disks: Vec<DiskExport> = Vec::new();
    for d in &a.disks {
        let name = d
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| format!("{} has no file name", d.display()))?;
        disks.push(DiskExport {
            name,
            path: d.clone(),
        });
    }
    for e in &a.exports {
        let (name, path) = split_pair(e, "--export")?;
        disks.push(DiskExport {
            name,
            path: PathBuf::from(path),
        });
    }
    for (i, d) in disks.iter().enumerate() {
        if disks[..i].iter().any(|o| o.name == d.name) {
            return Err(format!("two exports are named {:?}", d.name));
        }
    }
    let mut stores = Vec::new();
    for s in &a.datastores {
        let (name, dir) = split_pair(s, "--datastore")?;
        stores.push(Datastore::new(&name, std::path::Path::new(&dir)).map_err(|e| e.to_string())?);
    }
    if disks.is_empty() && stores.is_empty() {
        return Err(
            "nothing to export: name a DISK, --export NAME=DISK or --datastore NAME=DIR".into(),
        );
    }
    let mode = if a.read_only {
        Mode::ReadOnly
    } else if a.persistent {
        Mode::Persistent
    } else {
        Mode::NonPersistent
    };
    // Every named disk must open now: a typo fails here, not at a client's first try.
    for d in &disks {
        let o = vdisk::OpenOptions::new();
        let o = if mode == Mode::Persistent {
            o.write(true)
        } else {
            o
        };
        o.open(&d.path)
            .map_err(|e| format!("{} ({}): {e}", d.name, d.path.display()))?;
    }
    Ok(Exports::new(disks, stores, mode))
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

fn run(a: Args) -> Result<(), String> {
    if a.verbose > 0 {
        let level = if a.verbose > 1 { "debug" } else { "info" };
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(tracing_subscriber::EnvFilter::new(level))
            .init();
    }
    let (tls_mode, acceptor) = tls(&a)?;
    let exports = exports(&a)?;
    let mode = exports.mode();
    let tls_note = match tls_mode {
        TlsMode::Off => String::new(),
        m => format!(
            ", TLS {}{}",
            if m == TlsMode::On {
                "offered (plaintext allowed)"
            } else {
                "required"
            },
            if a.tls_ca.is_some() {
                " with client certificates"
            } else {
                ""
            }
        ),
    };
    let count = exports.list().len();
    let listener = match &a.socket {
        Some(p) => Listener::Unix(
            UnixListener::bind(p).map_err(|e| format!("cannot listen on {}: {e}", p.display()))?,
            p.clone(),
        ),
        None => Listener::Tcp(
            TcpListener::bind((a.bind.as_str(), a.port))
                .map_err(|e| format!("cannot listen on {}:{}: {e}", a.bind, a.port))?,
        ),
    };
    // Signals are taken by one thread; every thread started after this inherits the
    // mask.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        signals.add(s);
    }
    signals
        .thread_block()
        .map_err(|e| format!("cannot block signals: {e}"))?;
    let server = Server::with_tls(
        exports,
        tls_mode,
        acceptor.map(|a| Box::new(a) as Box<dyn vdisk_nbd::server::TlsAcceptor>),
    );
    server.set_limits(limits_of(&a));
    let wake: Box<dyn Fn() + Send> = match &listener {
        Listener::Tcp(l) => {
            let addr = l.local_addr().map_err(|e| e.to_string())?;
            eprintln!(
                "vdisk-nbd: serving {count} export(s), {}, on {addr}{tls_note}",
                mode.as_str()
            );
            Box::new(move || {
                let _ = TcpStream::connect(addr);
            })
        }
        Listener::Unix(_, p) => {
            eprintln!(
                "vdisk-nbd: serving {count} export(s), {}, on {}{tls_note}",
                mode.as_str(),
                p.display()
            );
            let p = p.clone();
            Box::new(move || {
                let _ = UnixStream::connect(&p);
            })
        }
    };
    let stopper = server.clone();
    std::thread::spawn(move || {
        if let Ok(sig) = signals.wait() {
            eprintln!("vdisk-nbd: {sig:?}: finishing requests in flight and closing the disks");
        }
        stopper.stop();
        wake();
    });
    match &listener {
        Listener::Tcp(l) => server.serve_tcp(l),
        Listener::Unix(l, _) => server.serve_unix(l),
    }
    server.stop();
    if let Listener::Unix(_, p) = &listener {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

fn main() -> ExitCode {
    let a = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    match run(a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(m) => {
            eprintln!("vdisk-nbd: error: {m}");
            ExitCode::FAILURE
        }
    }
}
