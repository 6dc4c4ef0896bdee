//! The remote half of the demo: a "host" serving the frozen snapshot with the
//! `vdisk-nbd` program (non-persistent, TLS on 127.0.0.1), and the "proxy" - the
//! `backup_proxy` program of vdisk-ffi, a libvixDiskLib client using the `nbdssl`
//! transport with the host's certificate pinned by its thumbprint - run for each
//! backup.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{e, run, DemoResult};

/// The export name the host gives the snapshot (as a datastore path).
pub const EXPORT: &str = "[datastore1] vm/vm.vmdk";

/// The host: certificates, and `vdisk-nbd` serving one disk until dropped.
pub struct Host {
    child: Child,
    /// The port it listens on.
    pub port: u16,
    /// The SHA-1 thumbprint of its certificate.
    pub thumbprint: String,
}

/// Makes the host's self-signed certificate in `dir` (once); returns its
/// thumbprint.
fn certificate(dir: &Path) -> DemoResult<(PathBuf, PathBuf, String)> {
    let openssl = crate::tool("openssl")
        .map_err(|_| "openssl is needed for the host's certificate (apt-get install openssl)")?;
    let (cert, key) = (dir.join("host-cert.pem"), dir.join("host-key.pem"));
    if !cert.is_file() || !key.is_file() {
        run(
            &openssl,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
                "-keyout",
                &key.to_string_lossy(),
                "-out",
                &cert.to_string_lossy(),
            ],
        )?;
    }
    let out = run(
        &openssl,
        &[
            "x509",
            "-in",
            &cert.to_string_lossy(),
            "-noout",
            "-fingerprint",
            "-sha1",
        ],
    )?;
    let thumbprint = out
        .trim()
        .split_once('=')
        .map(|(_, t)| t.to_string())
        .ok_or_else(|| format!("unexpected openssl output {out:?}"))?;
    Ok((cert, key, thumbprint))
}

fn free_port() -> DemoResult<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(e)?
        .local_addr()
        .map_err(e)?
        .port())
}

/// A program built beside this one (run-demo.sh builds them): `vdisk-nbd` or
/// `backup_proxy`.
fn program(name: &str) -> DemoResult<PathBuf> {
    let me = std::env::current_exe().map_err(e)?;
    let p = me.with_file_name(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "{} is missing: ./run-demo.sh builds it (cargo build --release -p vdisk-utils \
             --bin vdisk-nbd -p vdisk-ffi --bin backup_proxy)",
            p.display()
        ))
    }
}

impl Host {
    /// Starts serving `disk` (non-persistent, TLS required) on 127.0.0.1.
    pub fn serve(dir: &Path, disk: &Path) -> DemoResult<Host> {
        let (cert, key, thumbprint) = certificate(dir)?;
        let port = free_port()?;
        let log = std::fs::File::create(dir.join("host.log")).map_err(e)?;
        let child = Command::new(program("vdisk-nbd")?)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .arg("--export")
            .arg(format!("{EXPORT}={}", disk.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|err| format!("cannot start vdisk-nbd: {err}"))?;
        let mut host = Host {
            child,
            port,
            thumbprint,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = host.child.try_wait() {
                return Err(format!(
                    "vdisk-nbd exited ({status}): see {}",
                    dir.join("host.log").display()
                ));
            }
            if Instant::now() > deadline {
                return Err("vdisk-nbd did not start listening".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(host)
    }

    /// Stops the server (SIGTERM: it drains, then closes the disk and throws its
    /// redo log away).
    pub fn stop(mut self) -> DemoResult {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().map_err(e)?;
        if !status.success() {
            return Err(format!("vdisk-nbd ended with {status}"));
        }
        Ok(())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What the proxy reported of one backup.
pub struct Pulled {
    /// The transport mode.
    pub mode: String,
    /// The change ID of the disk as backed up.
    pub change_id: String,
    /// `full`, `incremental` or `full-after-refused-change-id`.
    pub kind: String,
    /// Areas copied.
    pub areas: u64,
    /// Bytes read from the host.
    pub bytes: u64,
    /// Seconds the copy took.
    pub seconds: f64,
}

/// Runs the proxy: a backup of the host's export into `out` (with `previous` =
/// (change ID, backup file), an incremental one).
pub fn pull(host: &Host, out: &Path, previous: Option<(&str, &Path)>) -> DemoResult<Pulled> {
    let mut cmd = Command::new(program("backup_proxy")?);
    cmd.args([
        "127.0.0.1",
        &host.port.to_string(),
        &host.thumbprint,
        EXPORT,
    ])
    .arg(out);
    if let Some((id, parent)) = previous {
        cmd.arg(id).arg(parent);
    }
    let output = cmd
        .output()
        .map_err(|err| format!("cannot run the proxy: {err}"))?;
    if !output.status.success() {
        return Err(format!(
            "the proxy failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let field = |k: &str| -> DemoResult<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .map(str::to_string)
            .ok_or_else(|| format!("the proxy did not report {k}: {text}"))
    };
    Ok(Pulled {
        mode: field("mode")?,
        change_id: field("change_id")?,
        kind: field("kind")?,
        areas: field("areas")?.parse().map_err(e)?,
        bytes: field("bytes")?.parse().map_err(e)?,
        seconds: field("seconds")?.parse().map_err(e)?,
    })
}
