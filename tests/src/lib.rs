//! Shared helpers of the interoperability tests: they check that disks written by
//! `vdisk` / `vdiskmanager` open in qemu-img, qemu-io and libvmdk (`vmdkinfo`), that
//! disks written by qemu read identically through `vdisk`, and that genuine VMware
//! samples read to their known content.
//!
//! External tools are required: a missing tool makes the test panic (CI must fail
//! loudly, never skip). The `vdiskmanager` binary is built by cargo only when the
//! `vdisk-utils` package is part of the build, so run these tests with
//! `cargo test --workspace` (or build the workspace first).

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};
use vdisk::Disk;

/// One kibibyte.
pub const KIB: u64 = 1 << 10;
/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// One gibibyte.
pub const GIB: u64 = 1 << 30;

/// Bytes per read when streaming through a whole disk.
const STREAM_CHUNK: usize = 4 << 20;

/// Returns the full path of the external tool `name` found in `PATH`; panics with a
/// clear message if it is not installed (tests must fail, never skip silently).
pub fn require_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "required external tool `{name}` was not found in PATH; install it \
         (qemu-img/qemu-io: package qemu-utils; vmdkinfo: package libvmdk-utils) - \
         these interoperability tests never skip"
    );
}

/// The command line of `cmd args...` as text, for messages.
fn command_line<S: AsRef<OsStr>>(cmd: &OsStr, args: &[S]) -> String {
    let mut s = cmd.to_string_lossy().into_owned();
    for a in args {
        s.push(' ');
        s.push_str(&a.as_ref().to_string_lossy());
    }
    s
}

/// Runs `cmd args...` and returns its output whatever the exit status. A tool name
/// without a slash must be installed (see [`require_tool`]).
pub fn run_unchecked<S: AsRef<OsStr>>(cmd: impl AsRef<OsStr>, args: &[S]) -> Output {
    let cmd = cmd.as_ref();
    let program = if cmd.to_string_lossy().contains('/') {
        PathBuf::from(cmd)
    } else {
        require_tool(&cmd.to_string_lossy())
    };
    Command::new(&program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", command_line(cmd, args)))
}

/// Runs `cmd args...`, asserts that it succeeded (showing its stdout and stderr if
/// not) and returns its output.
pub fn run<S: AsRef<OsStr>>(cmd: impl AsRef<OsStr>, args: &[S]) -> Output {
    let out = run_unchecked(cmd.as_ref(), args);
    assert!(
        out.status.success(),
        "`{}` failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        command_line(cmd.as_ref(), args),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `cmd args...`, asserts that it FAILED (non-zero exit) and returns its output.
pub fn run_failing<S: AsRef<OsStr>>(cmd: impl AsRef<OsStr>, args: &[S]) -> Output {
    let out = run_unchecked(cmd.as_ref(), args);
    assert!(
        !out.status.success(),
        "`{}` succeeded but was expected to fail\n--- stdout ---\n{}\n--- stderr ---\n{}",
        command_line(cmd.as_ref(), args),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Stdout of a command as text.
pub fn stdout_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Stderr of a command as text.
pub fn stderr_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A path as `&str` (test paths are always UTF-8).
pub fn path_str(p: &Path) -> &str {
    p.to_str()
        .unwrap_or_else(|| panic!("non UTF-8 path {}", p.display()))
}

/// The `vdiskmanager` binary of the current build: `target/<profile>/vdiskmanager`,
/// found from the test executable, which lives in `target/<profile>/deps/`. Panics
/// with a clear message if it has not been built.
pub fn vdiskmanager_bin() -> PathBuf {
    static FRESH: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    workspace_bin(
        "vdiskmanager",
        &[
            "vdisk/src",
            "utils/src/lib.rs",
            "utils/src/bin/vdiskmanager.rs",
        ],
        &FRESH,
    )
}

/// The `vdisk-mount` binary of the current build (`target/<profile>/vdisk-mount`),
/// checked like [`vdiskmanager_bin`].
pub fn vdisk_mount_bin() -> PathBuf {
    static FRESH: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    workspace_bin(
        "vdisk-mount",
        &[
            "vdisk/src",
            "vdisk-mount/src",
            "utils/src/lib.rs",
            "utils/src/bin/vdisk-mount.rs",
        ],
        &FRESH,
    )
}

/// The `vdisk-nbd` binary of the current build (`target/<profile>/vdisk-nbd`),
/// checked like [`vdiskmanager_bin`].
pub fn vdisk_nbd_bin() -> PathBuf {
    static FRESH: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    workspace_bin(
        "vdisk-nbd",
        &["vdisk/src", "vdisk-nbd/src", "utils/src/bin/vdisk-nbd.rs"],
        &FRESH,
    )
}

/// The `vdisk-proxy` binary of the current build (`target/<profile>/vdisk-proxy`,
/// package `vdisk-proxy` in examples/proxy): reads disks through the C API's
/// nbd transport, checked like [`vdiskmanager_bin`].
pub fn vdisk_proxy_bin() -> PathBuf {
    static FRESH: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    package_bin(
        "vdisk-proxy",
        "vdisk-proxy",
        &[
            "vdisk/src",
            "vdisk-nbd/src",
            "vdisk-ffi/src",
            "examples/proxy",
        ],
        &FRESH,
    )
}

/// A `vdisk-nbd` server run for a test: started with `args` on a Unix socket of its
/// own (or on TCP when `args` say so), ready when [`NbdServer::start`] returns,
/// stopped by SIGTERM when dropped (and waited for).
pub struct NbdServer {
    child: std::process::Child,
    /// The Unix socket it listens on (unless TCP was asked for).
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl NbdServer {
    /// Starts `vdisk-nbd --socket SOCK args...`.
    pub fn start<S: AsRef<OsStr>>(args: &[S]) -> NbdServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("nbd.sock");
        let mut cmd = std::process::Command::new(vdisk_nbd_bin());
        cmd.arg("--socket").arg(&socket).args(args);
        NbdServer::spawn(cmd, socket, dir, None)
    }

    /// Starts `vdisk-nbd args...` listening on TCP `port` of 127.0.0.1.
    pub fn start_tcp<S: AsRef<OsStr>>(port: u16, args: &[S]) -> NbdServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = std::process::Command::new(vdisk_nbd_bin());
        cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(args);
        NbdServer::spawn(cmd, PathBuf::new(), dir, Some(port))
    }

    fn spawn(
        mut cmd: std::process::Command,
        socket: PathBuf,
        dir: tempfile::TempDir,
        port: Option<u16>,
    ) -> NbdServer {
        let log = std::fs::File::create(dir.path().join("server.log")).expect("log");
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log);
        let mut child = cmd.spawn().expect("start vdisk-nbd");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let up = match port {
                Some(p) => std::net::TcpStream::connect(("127.0.0.1", p)).is_ok(),
                None => std::os::unix::net::UnixStream::connect(&socket).is_ok(),
            };
            if up {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log =
                    std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
                panic!("vdisk-nbd exited ({status}) before listening: {log}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "vdisk-nbd did not start listening"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        NbdServer {
            child,
            socket,
            _dir: dir,
        }
    }

    /// The NBD URI of export `name` on the Unix socket (the name percent-encoded).
    pub fn uri(&self, name: &str) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            uri_escape(name),
            self.socket.display()
        )
    }

    /// The server's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's peak resident memory so far (see [`peak_rss_bytes`]).
    pub fn peak_rss_bytes(&self) -> u64 {
        peak_rss_bytes(self.child.id())
    }

    /// What the server wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("server.log")).unwrap_or_default()
    }

    /// Stops it with SIGTERM and returns its exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.terminate()
    }

    /// Kills it with SIGKILL (no chance to flush or close anything) and waits.
    pub fn kill(mut self) -> std::process::ExitStatus {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &self.child.id().to_string()])
            .status();
        self.child.wait().expect("wait for vdisk-nbd")
    }

    /// Sends SIGTERM without waiting (see [`NbdServer::wait`]).
    pub fn terminate_now(&self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Waits for it to exit.
    pub fn wait(mut self) -> std::process::ExitStatus {
        self.child.wait().expect("wait for vdisk-nbd")
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().expect("wait for vdisk-nbd")
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.terminate();
        }
    }
}

/// Certificates for NBD over TLS, made by `openssl` at test time (the recipe of
/// shared/docs/nbd.md §3). [`TlsPki::dir`] is laid out as libnbd
/// (`tls-certificates=DIR`) and qemu (`tls-creds-x509,dir=DIR`) read it: `ca-cert.pem`,
/// `server-cert.pem` (CN localhost, SAN `DNS:localhost`, `IP:127.0.0.1`),
/// `server-key.pem`, `client-cert.pem` (CN vdisk-client), `client-key.pem`.
pub struct TlsPki {
    /// The certificate folder.
    pub dir: PathBuf,
    /// Trusts the server, but its client certificate comes from another CA.
    pub rogue_client_dir: PathBuf,
    /// Trusts the server and has no client certificate.
    pub anonymous_dir: PathBuf,
}

impl TlsPki {
    /// Makes the certificates in `dir` (panics naming the package if `openssl` is
    /// missing: tests never skip).
    pub fn new(dir: &Path) -> TlsPki {
        require_tool_from("openssl", "openssl");
        let pki = TlsPki {
            dir: dir.join("pki"),
            rogue_client_dir: dir.join("pki-rogue"),
            anonymous_dir: dir.join("pki-anonymous"),
        };
        for d in [&pki.dir, &pki.rogue_client_dir, &pki.anonymous_dir] {
            std::fs::create_dir_all(d).expect("create a certificate folder");
        }
        // `args` split at spaces (no argument here holds one).
        let openssl = |args: &str| {
            let out = Command::new("openssl")
                .args(args.split(' '))
                .current_dir(dir)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ca = |name: &str, cn: &str| {
            openssl(&format!(
                "req -x509 -newkey rsa:2048 -nodes -days 3650 -keyout {name}-key.pem \
                 -out {name}-cert.pem -subj /CN={cn} -addext basicConstraints=critical,CA:TRUE \
                 -addext keyUsage=critical,keyCertSign,cRLSign"
            ));
        };
        // A certificate `name` signed by CA `ca` with the extensions `ext`.
        let leaf = |name: &str, cn: &str, ca: &str, ext: &str| {
            std::fs::write(dir.join(format!("{name}.ext")), ext).expect("write extensions");
            openssl(&format!(
                "req -newkey rsa:2048 -nodes -keyout {name}-key.pem -out {name}.csr -subj /CN={cn}"
            ));
            openssl(&format!(
                "x509 -req -in {name}.csr -days 3650 -CA {ca}-cert.pem -CAkey {ca}-key.pem \
                 -CAcreateserial -extfile {name}.ext -out {name}-cert.pem"
            ));
        };
        let client_ext = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n";
        ca("ca", "vdisk-test-CA");
        ca("rogue-ca", "another-CA");
        leaf(
            "server",
            "localhost",
            "ca",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
        );
        leaf("client", "vdisk-client", "ca", client_ext);
        leaf("rogue-client", "vdisk-client", "rogue-ca", client_ext);
        let copy = |from: &str, to: &Path| {
            std::fs::copy(dir.join(from), to).expect("copy a certificate");
        };
        for f in [
            "ca-cert.pem",
            "server-cert.pem",
            "server-key.pem",
            "client-cert.pem",
            "client-key.pem",
        ] {
            copy(f, &pki.dir.join(f));
        }
        copy("ca-cert.pem", &pki.rogue_client_dir.join("ca-cert.pem"));
        copy(
            "rogue-client-cert.pem",
            &pki.rogue_client_dir.join("client-cert.pem"),
        );
        copy(
            "rogue-client-key.pem",
            &pki.rogue_client_dir.join("client-key.pem"),
        );
        copy("ca-cert.pem", &pki.anonymous_dir.join("ca-cert.pem"));
        pki
    }

    /// `dir/name`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The server's arguments: `--tls-cert`, `--tls-key`, and with `verify_clients`
    /// `--tls-ca` (client certificates required).
    pub fn server_args(&self, verify_clients: bool) -> Vec<String> {
        let mut a = vec![
            "--tls-cert".to_string(),
            path_str(&self.file("server-cert.pem")).to_string(),
            "--tls-key".to_string(),
            path_str(&self.file("server-key.pem")).to_string(),
        ];
        if verify_clients {
            a.push("--tls-ca".into());
            a.push(path_str(&self.file("ca-cert.pem")).into());
        }
        a
    }
}

/// A TCP port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("its address")
        .port()
}

/// Percent-encodes what an NBD URI path cannot hold as it is.
pub fn uri_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The binary `name` of the vdisk-utils package in `target/<profile>/`, checked
/// (once, through `fresh`) to be newer than the sources under `sources`.
fn workspace_bin(name: &str, sources: &[&str], fresh: &std::sync::OnceLock<()>) -> PathBuf {
    package_bin(name, "vdisk-utils", sources, fresh)
}

/// The binary `name` of the workspace package `package` in `target/<profile>/`,
/// checked (once, through `fresh`) to be newer than the sources under `sources`.
fn package_bin(
    name: &str,
    package: &str,
    sources: &[&str],
    fresh: &std::sync::OnceLock<()>,
) -> PathBuf {
    let exe = std::env::current_exe().expect("cannot locate the test executable");
    let deps = exe.parent().expect("test executable has no parent folder");
    let profile_dir = if deps.file_name() == Some(OsStr::new("deps")) {
        deps.parent().expect("deps folder has no parent")
    } else {
        deps
    };
    let bin = profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "the {name} binary was not found at {}: cargo builds it only when the \
         {package} package is built too - run `cargo test --workspace` (or \
         `cargo build -p {package}` before `cargo test -p vdisk-interop`)",
        bin.display()
    );
    fresh.get_or_init(|| assert_binary_is_fresh(&bin, package, sources));
    bin
}

/// The path of the external tool `name`, searched in `PATH` and the sbin folders
/// (mkfs, sfdisk and losetup live there); panics naming the Debian `package` that
/// provides it if it is not installed (tests never skip).
pub fn require_tool_from(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "required external tool `{name}` was not found: install the Debian package \
         `{package}` (apt-get install {package}) - these tests never skip"
    );
}

/// Newest modification time of the `.rs` files under `dir` (recursively), or of
/// `dir` itself if it is a file.
fn newest_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    if dir.is_file() {
        return std::fs::metadata(dir).and_then(|m| m.modified()).ok();
    }
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_mtime(&path)
        } else if path.extension().is_some_and(|e| e == "rs") {
            entry.metadata().and_then(|m| m.modified()).ok()
        } else {
            None
        };
        newest = newest.max(t);
    }
    newest
}

/// Panics if a source file under `sources` (folders or files of the workspace) is newer than
/// the binary `bin`: `cargo test -p vdisk-interop` does not rebuild it, and testing a
/// stale binary would test old code.
fn assert_binary_is_fresh(bin: &Path, package: &str, sources: &[&str]) {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok();
    let sources = sources
        .iter()
        .filter_map(|d| newest_mtime(&workspace.join(d)))
        .max();
    if let (Some(built), Some(sources)) = (built, sources) {
        assert!(
            sources <= built,
            "the binary {} is older than its sources: rebuild it \
             (`cargo build -p {package}`) or run the tests with `cargo test --workspace`",
            bin.display()
        );
    }
}

/// Runs `vdiskmanager args...` and asserts success.
pub fn vdiskmanager<S: AsRef<OsStr>>(args: &[S]) -> Output {
    run(vdiskmanager_bin(), args)
}

/// Runs `vdiskmanager args...` and asserts failure.
pub fn vdiskmanager_failing<S: AsRef<OsStr>>(args: &[S]) -> Output {
    run_failing(vdiskmanager_bin(), args)
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Lowercase hex SHA-256 of a whole file, read in chunks.
pub fn sha256_file(path: &Path) -> String {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; STREAM_CHUNK];
    loop {
        let n = f
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("{:x}", h.finalize())
}

/// Converts `disk` (format probed by qemu: `vmdk` or `raw`) into the raw file `out`
/// with `qemu-img convert -O raw`.
pub fn qemu_raw_to(disk: &Path, out: &Path) {
    run(
        "qemu-img",
        &["convert", "-O", "raw", path_str(disk), path_str(out)],
    );
}

/// The whole content of the VMDK `disk` as qemu reads it (`qemu-img convert -O raw`).
pub fn qemu_raw(disk: &Path) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("qemu.raw");
    qemu_raw_to(disk, &out);
    std::fs::read(&out).expect("read qemu raw output")
}

/// Opens `path` read-only through the library, panicking with the error if it fails.
pub fn open_ours(path: &Path) -> Disk {
    Disk::open(path).unwrap_or_else(|e| panic!("vdisk cannot open {}: {e}", path.display()))
}

/// `len` bytes at `offset` of `path`, read through `vdisk::Disk`.
pub fn read_ours_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let disk = open_ours(path);
    let mut buf = vec![0u8; len];
    disk.read_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("vdisk read of {len} at {offset} in {}: {e}", path.display()));
    buf
}

/// The whole content of `path`, read through `vdisk::Disk`.
pub fn read_all_ours(path: &Path) -> Vec<u8> {
    let disk = open_ours(path);
    let len = usize::try_from(disk.capacity()).expect("disk too big to read in memory");
    let mut buf = vec![0u8; len];
    for (i, chunk) in buf.chunks_mut(STREAM_CHUNK).enumerate() {
        let off = (i * STREAM_CHUNK) as u64;
        disk.read_at(chunk, off)
            .unwrap_or_else(|e| panic!("vdisk read at {off} in {}: {e}", path.display()));
    }
    buf
}

/// SHA-256 of the whole content of `path` read through `vdisk::Disk` in chunks
/// (bounded memory, for big disks).
pub fn sha256_ours(path: &Path) -> String {
    let disk = open_ours(path);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; STREAM_CHUNK];
    let mut off = 0u64;
    while off < disk.capacity() {
        let n = (disk.capacity() - off).min(STREAM_CHUNK as u64) as usize;
        disk.read_at(&mut buf[..n], off)
            .unwrap_or_else(|e| panic!("vdisk read at {off} in {}: {e}", path.display()));
        h.update(&buf[..n]);
        off += n as u64;
    }
    format!("{:x}", h.finalize())
}

/// Asserts that the disk `path` read through `vdisk::Disk` equals the raw file `raw`
/// byte for byte (and in length), comparing chunk by chunk; the message names the
/// first differing offset.
pub fn assert_ours_equals_raw_file(path: &Path, raw: &Path) {
    let disk = open_ours(path);
    let raw_len = std::fs::metadata(raw).expect("raw file").len();
    assert_eq!(
        disk.capacity(),
        raw_len,
        "capacity of {} differs from the length of {}",
        path.display(),
        raw.display()
    );
    let mut f = File::open(raw).expect("open raw");
    let mut ours = vec![0u8; STREAM_CHUNK];
    let mut theirs = vec![0u8; STREAM_CHUNK];
    let mut off = 0u64;
    while off < raw_len {
        let n = (raw_len - off).min(STREAM_CHUNK as u64) as usize;
        disk.read_at(&mut ours[..n], off)
            .unwrap_or_else(|e| panic!("vdisk read at {off} in {}: {e}", path.display()));
        f.read_exact(&mut theirs[..n]).expect("read raw");
        if ours[..n] != theirs[..n] {
            let i = (0..n).find(|&i| ours[i] != theirs[i]).unwrap_or(0);
            panic!(
                "{} differs from {} at byte {}: vdisk read {:#04x}, expected {:#04x}",
                path.display(),
                raw.display(),
                off + i as u64,
                ours[i],
                theirs[i]
            );
        }
        off += n as u64;
    }
}

/// Asserts that two byte slices are equal, naming the first differing offset
/// instead of printing megabytes of bytes.
pub fn assert_same_bytes(what: &str, got: &[u8], expected: &[u8]) {
    assert_eq!(got.len(), expected.len(), "{what}: lengths differ");
    if got != expected {
        let i = (0..got.len()).find(|&i| got[i] != expected[i]).unwrap_or(0);
        panic!(
            "{what}: first difference at byte {i}: got {:#04x}, expected {:#04x}",
            got[i], expected[i]
        );
    }
}

/// The folder of genuine VMware samples (`/work/shared/corpus/vmware` next to the
/// workspace): `CARGO_MANIFEST_DIR/../../shared/corpus/vmware`.
pub fn corpus_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/vmware");
    assert!(
        dir.join("README.md").is_file(),
        "the VMware sample corpus was not found at {}",
        dir.display()
    );
    dir
}

/// Deterministic pseudo-random bytes (splitmix64 of `seed` and the position), so
/// every test run writes and expects the same data. No byte run of it is all zeros
/// for long.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x0123_4567_89ab_cdef;
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        out.extend_from_slice(&(z | 1).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Sorts byte ranges `(start, length)` and merges overlapping or adjacent ones.
pub fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|r| r.1 > 0);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, l) in ranges {
        match out.last_mut() {
            Some((ls, ll)) if *ls + *ll >= s => *ll = (*ll).max(s + l - *ls),
            _ => out.push((s, l)),
        }
    }
    out
}

/// The merged ranges of a `qemu-img map --output=json`-style JSON array (also the
/// output of `vdiskmanager map --json`) whose entries satisfy `keep`, which is given
/// the entry's `(present, zero, data)` flags.
pub fn ranges_of_map_json(json: &str, keep: impl Fn(bool, bool, bool) -> bool) -> Vec<(u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("map output is not JSON ({e}):\n{json}"));
    let arr = v.as_array().expect("map output is not a JSON array");
    let flag = |r: &serde_json::Value, name: &str| {
        r[name]
            .as_bool()
            .unwrap_or_else(|| panic!("map entry without \"{name}\": {r}"))
    };
    let ranges = arr
        .iter()
        .filter(|r| keep(flag(r, "present"), flag(r, "zero"), flag(r, "data")))
        .map(|r| {
            (
                r["start"].as_u64().expect("map entry without \"start\""),
                r["length"].as_u64().expect("map entry without \"length\""),
            )
        })
        .collect();
    merge_ranges(ranges)
}

/// The merged ranges with `"data": true` and `"zero": false` of a map JSON array (see
/// [`ranges_of_map_json`]).
///
/// A run that reads as zeros is not data, whatever its `data` flag: qemu-img says
/// `"data": true, "zero": true` for the holes of a flat extent's file, which we
/// map as zeros (no data: convert and backups skip them).
pub fn data_ranges_of_map_json(json: &str) -> Vec<(u64, u64)> {
    ranges_of_map_json(json, |_, zero, data| data && !zero)
}

/// The merged ranges that are present but read as zeros (zeroed grains, holes of
/// flat extents, whatever the `data` flag says: see [`data_ranges_of_map_json`]) of
/// a map JSON array (see [`ranges_of_map_json`]).
pub fn zero_ranges_of_map_json(json: &str) -> Vec<(u64, u64)> {
    ranges_of_map_json(json, |present, zero, _| present && zero)
}

/// The JSON allocation map of `disk` printed by `qemu-img map --output=json`.
pub fn qemu_map_json(disk: &Path) -> String {
    let out = run(
        "qemu-img",
        &["map", "--output=json", "-f", "vmdk", path_str(disk)],
    );
    stdout_text(&out)
}

/// The JSON allocation map of `disk` printed by `vdiskmanager map --json`.
pub fn vdiskmanager_map_json(disk: &Path) -> String {
    stdout_text(&vdiskmanager(&["map", "--json", path_str(disk)]))
}

/// Data ranges of `disk` according to `qemu-img map --output=json`.
pub fn qemu_data_ranges(disk: &Path) -> Vec<(u64, u64)> {
    data_ranges_of_map_json(&qemu_map_json(disk))
}

/// Data ranges of `disk` according to `vdiskmanager map --json`.
pub fn vdiskmanager_data_ranges(disk: &Path) -> Vec<(u64, u64)> {
    data_ranges_of_map_json(&vdiskmanager_map_json(disk))
}

/// `qemu-img info --output=json` of `disk`, parsed.
pub fn qemu_info(disk: &Path) -> serde_json::Value {
    let out = run("qemu-img", &["info", "--output=json", path_str(disk)]);
    serde_json::from_slice(&out.stdout).expect("qemu-img info output is not JSON")
}

/// `vdiskmanager info --json` of `disk`, parsed.
pub fn vdiskmanager_info(disk: &Path) -> serde_json::Value {
    let out = vdiskmanager(&["info", "--json", path_str(disk)]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "vdiskmanager info --json output is not JSON ({e}):\n{}",
            stdout_text(&out)
        )
    })
}

/// A fresh temporary folder, removed when dropped.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("cannot create a temporary folder")
}

/// Asserts `qemu-img compare` finds `a` (format `fa`) and `b` (format `fb`) identical.
pub fn assert_qemu_identical(a: &Path, fa: &str, b: &Path, fb: &str, what: &str) {
    let out = run(
        "qemu-img",
        &["compare", "-f", fa, "-F", fb, path_str(a), path_str(b)],
    );
    assert!(
        stdout_text(&out).contains("Images are identical"),
        "{what}: qemu-img compare: {}",
        stdout_text(&out)
    );
}

/// Asserts `qemu-img check` finds no errors in the VMDK `disk`.
pub fn assert_qemu_check_clean(disk: &Path, what: &str) {
    let out = run("qemu-img", &["check", "-f", "vmdk", path_str(disk)]);
    assert!(
        stdout_text(&out).contains("No errors were found"),
        "{what}: qemu-img check: {}",
        stdout_text(&out)
    );
}

/// Runs `vdiskmanager convert -q -f FROM -O TO [-t T] SRC DST` and asserts success.
pub fn vdiskmanager_convert(from: &str, to: &str, t: Option<u32>, src: &Path, dst: &Path) {
    let t = t.map(|t| t.to_string());
    let mut args = vec!["convert", "-q", "-f", from, "-O", to];
    if let Some(t) = &t {
        args.extend(["-t", t.as_str()]);
    }
    args.extend([path_str(src), path_str(dst)]);
    vdiskmanager(&args);
}

/// Writes into `disk` with one qemu-io run: `(pattern, offset, length)` each, pattern
/// 0 meaning `write -z` (zero write).
pub fn qemu_io_write(disk: &Path, writes: &[(u8, u64, u64)]) {
    let mut args = vec!["-f".to_string(), "vmdk".to_string()];
    for &(p, off, len) in writes {
        args.push("-c".into());
        args.push(if p == 0 {
            format!("write -z {off} {len}")
        } else {
            format!("write -P {p:#04x} {off} {len}")
        });
    }
    args.push(path_str(disk).to_string());
    run("qemu-io", &args);
}

/// A monolithicSparse disk of 8 MiB at `dir/bad-gt.vmdk` whose first 64 KiB hold
/// 0x42 and whose grain at 4 MiB is named by a grain-table entry pointing past the
/// end of the file: it opens and reads everywhere but there, and a walk of its whole
/// allocation map fails.
pub fn sparse_with_a_grain_past_the_end(dir: &Path) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let path = dir.join("bad-gt.vmdk");
    vdisk::create(
        &path,
        &vdisk::CreateOptions::new(vdisk::DiskType::MonolithicSparse, 8 * MIB),
    )
    .unwrap();
    let d = vdisk::OpenOptions::new().write(true).open(&path).unwrap();
    d.write_at(&[0x42; 64 << 10], 0).unwrap();
    d.close().unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut head = [0u8; vdisk::extent::sparse::header::HEADER_SIZE];
    f.read_exact_at(&mut head, 0).unwrap();
    let h = vdisk::extent::sparse::header::SparseHeader::parse(&head).unwrap();
    let mut gde = [0u8; 4];
    f.read_exact_at(&mut gde, h.gd_offset * 512).unwrap();
    let table = u64::from(u32::from_le_bytes(gde)) * 512;
    let grain = 4 * MIB / (h.grain_size * 512);
    let past_end = u32::try_from(f.metadata().unwrap().len() / 512 + 4096).unwrap();
    f.write_all_at(&past_end.to_le_bytes(), table + grain * 4)
        .unwrap();
    f.sync_all().unwrap();
    path
}

/// The peak resident memory of process `pid` so far, in bytes (`VmHWM` of
/// /proc/PID/status).
pub fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("read the process's /proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib * 1024
}

/// SplitMix64: a small seeded generator for test plans (random requests, kill
/// times), reproducible from its seed.
#[derive(Clone, Debug)]
pub struct SplitMix(pub u64);

impl SplitMix {
    /// A generator for `seed`, mixed with the golden-ratio constant (seeds that
    /// differ little start far apart).
    pub fn new(seed: u64) -> SplitMix {
        SplitMix(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    /// The next value. (Not `Iterator::next`: the sequence never ends, and an
    /// `Option` at every call would only be unwrapped.)
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 for `n` = 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

/// A number from the environment (decimal, or hex with `0x`): a test's seed or
/// count; None when unset, a panic naming the variable when malformed.
pub fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v}: {e}")))
}

/// A datastore of sparse disks with data of their own, for scale tests: disk `d` is
/// `vmNN/vmNN.vmdk` under the store's root (`[ds] vmNN/vmNN.vmdk` to
/// `vdisk-nbd --datastore ds=ROOT`) and holds [`ScaleStore::RUNS`] runs, one in each
/// eighth of it, taken from different places of one shared pattern, at offsets and
/// lengths that differ from disk to disk and are not sector-aligned - so no two
/// disks hold the same bytes.
pub struct ScaleStore {
    /// Number of disks.
    pub disks: usize,
    /// Each disk's virtual size.
    pub disk_bytes: u64,
    /// The shared pattern the runs are taken from.
    pub data: Vec<u8>,
}

impl ScaleStore {
    /// Data runs per disk.
    pub const RUNS: u64 = 8;

    /// `disks` disks of `disk_bytes` (at least 8 MiB) made in `root`, the pattern
    /// from `seed`.
    pub fn create(root: &Path, disks: usize, disk_bytes: u64, seed: u64) -> ScaleStore {
        let mut store = ScaleStore {
            disks,
            disk_bytes,
            data: Vec::new(),
        };
        let len = (0..disks)
            .flat_map(|d| store.runs(d))
            .map(|(_, s, l)| s + l as usize)
            .max()
            .unwrap_or(0);
        store.data = pattern(seed, len);
        for d in 0..disks {
            let dir = root.join(format!("vm{d:02}"));
            std::fs::create_dir_all(&dir).expect("create a disk folder");
            let p = dir.join(format!("vm{d:02}.vmdk"));
            vdisk::create(
                &p,
                &vdisk::CreateOptions::new(vdisk::DiskType::MonolithicSparse, disk_bytes),
            )
            .expect("create a scale disk");
            let disk = vdisk::OpenOptions::new()
                .write(true)
                .open(&p)
                .expect("open a scale disk");
            for (at, source, len) in store.runs(d) {
                disk.write_at(&store.data[source..source + len as usize], at)
                    .expect("write a run");
            }
            disk.close().expect("close a scale disk");
        }
        store
    }

    /// The export name of disk `d` in datastore `ds`.
    pub fn export_name(d: usize) -> String {
        format!("[ds] vm{d:02}/vm{d:02}.vmdk")
    }

    /// The data runs of disk `d`: (disk offset, offset in the pattern, length).
    pub fn runs(&self, d: usize) -> Vec<(u64, usize, u64)> {
        let d = d as u64;
        (0..Self::RUNS)
            .map(|i| {
                let offset = i * (self.disk_bytes / Self::RUNS) + d * 64 * KIB + d * 7 + i;
                let source = ((d * Self::RUNS + i) * 4 * KIB) as usize;
                let len = 768 * KIB + d * 1000 + i * 4096;
                (offset, source, len)
            })
            .collect()
    }

    /// Bytes of data disk `d` holds.
    pub fn data_bytes(&self, d: usize) -> u64 {
        self.runs(d).iter().map(|r| r.2).sum()
    }

    /// What disk `d` holds at `[offset, offset + buf.len())`.
    pub fn expected(&self, d: usize, offset: u64, buf: &mut [u8]) {
        buf.fill(0);
        let end = offset + buf.len() as u64;
        for (at, source, len) in self.runs(d) {
            let (lo, hi) = (at.max(offset), (at + len).min(end));
            if lo < hi {
                let n = (hi - lo) as usize;
                let from = source + (lo - at) as usize;
                let to = (lo - offset) as usize;
                buf[to..to + n].copy_from_slice(&self.data[from..from + n]);
            }
        }
    }

    /// The SHA-256 (hex) of disk `d`'s whole content.
    pub fn expected_sha256(&self, d: usize) -> String {
        let mut sha = Sha256::new();
        let mut buf = vec![0u8; MIB as usize];
        let mut at = 0;
        while at < self.disk_bytes {
            let n = (self.disk_bytes - at).min(MIB) as usize;
            self.expected(d, at, &mut buf[..n]);
            sha.update(&buf[..n]);
            at += n as u64;
        }
        sha.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The SHA-256 of every file in `folder`, by name (what "no file changed" compares).
pub fn folder_hashes(folder: &Path) -> std::collections::BTreeMap<String, String> {
    std::fs::read_dir(folder)
        .expect("read a folder")
        .map(|e| e.expect("a folder entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name()
                    .expect("a file name")
                    .to_string_lossy()
                    .into_owned(),
                sha256_file(&p),
            )
        })
        .collect()
}

/// Waits (10 s at most) until the files of `folder` have the hashes `before` again:
/// a server marks a disk open while clients are connected and closes it after the
/// last one has gone. Panics, naming `what` and the change, if they never do.
pub fn assert_files_unchanged(
    folder: &Path,
    before: &std::collections::BTreeMap<String, String>,
    what: &str,
) {
    let start = std::time::Instant::now();
    loop {
        let now = folder_hashes(folder);
        if now == *before {
            return;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "{what}: the files changed: {before:?} -> {now:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_deterministic_and_seeded() {
        assert_eq!(pattern(7, 1000), pattern(7, 1000));
        assert_ne!(pattern(7, 64), pattern(8, 64));
        assert_eq!(&pattern(3, 100)[..10], &pattern(3, 10)[..]);
        assert!(pattern(1, 4096)
            .chunks(8)
            .all(|c| c.iter().any(|&b| b != 0)));
    }

    #[test]
    fn ranges_merge_when_adjacent_or_overlapping() {
        assert_eq!(
            merge_ranges(vec![(10, 5), (0, 10), (20, 1), (15, 0), (21, 4), (22, 1)]),
            vec![(0, 15), (20, 5)]
        );
    }

    #[test]
    fn map_json_data_ranges() {
        let j = r#"[{"start":0,"length":512,"present":true,"zero":false,"data":true},
                    {"start":512,"length":512,"present":true,"zero":false,"data":true},
                    {"start":1024,"length":10,"present":true,"zero":true,"data":false},
                    {"start":1034,"length":6,"present":false,"zero":true,"data":false}]"#;
        assert_eq!(data_ranges_of_map_json(j), vec![(0, 1024)]);
        assert_eq!(zero_ranges_of_map_json(j), vec![(1024, 10)]);
    }
}
