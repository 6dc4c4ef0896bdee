//! A remote incremental backup through libvixDiskLib's `nbdssl` transport, by the
//! `backup_proxy` program (the proxy of the README's main job) against the
//! `vdisk-nbd` program with TLS: a full backup, writes, an incremental backup with
//! the previous change ID, each restored equal to the disk it was taken of; a
//! change ID the host refuses makes the proxy take a full backup instead; a wrong
//! thumbprint is refused before any data.

use std::path::{Path, PathBuf};
use std::process::Command;

use vdisk::{create, CreateOptions, DiskType, OpenOptions};
use vdisk_interop::{free_port, path_str, pattern, tempdir, NbdServer, TlsPki, MIB};

/// The proxy program (a binary of this crate).
fn proxy_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_backup_proxy"))
}

fn thumbprint(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha1", "-in"])
        .arg(cert)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .split_once('=')
        .unwrap()
        .1
        .to_string()
}

struct Pulled {
    kind: String,
    change_id: String,
}

fn pull(port: u16, thumb: &str, out: &Path, previous: Option<(&str, &Path)>) -> Pulled {
    let mut cmd = Command::new(proxy_bin());
    cmd.args(["127.0.0.1", &port.to_string(), thumb, "vm"])
        .arg(out);
    if let Some((id, parent)) = previous {
        cmd.arg(id).arg(parent);
    }
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "backup_proxy failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .unwrap_or_else(|| panic!("no {k} in {text}"))
            .to_string()
    };
    assert_eq!(field("mode"), "nbdssl");
    Pulled {
        kind: field("kind"),
        change_id: field("change_id"),
    }
}

/// Every byte of backup chain `backup` equals `disk`.
fn assert_restores_to(backup: &Path, disk: &Path) {
    let b = OpenOptions::new().open(backup).unwrap();
    let d = OpenOptions::new().open(disk).unwrap();
    assert_eq!(b.capacity(), d.capacity());
    let (mut x, mut y) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    for at in (0..d.capacity()).step_by(MIB as usize) {
        b.read_at(&mut x, at).unwrap();
        d.read_at(&mut y, at).unwrap();
        assert!(x == y, "{} differs at {at}", backup.display());
    }
}

fn serve(disk: &Path, pki: &TlsPki, port: u16) -> NbdServer {
    let mut args = vec!["--export".to_string(), format!("vm={}", path_str(disk))];
    args.extend(pki.server_args(false));
    NbdServer::start_tcp(port, &args)
}

#[test]
fn full_then_incremental_over_nbdssl_and_a_refused_change_id() {
    let dir = tempdir();
    let disk = dir.path().join("vm.vmdk");
    create(
        &disk,
        &CreateOptions::new(DiskType::MonolithicSparse, 64 * MIB),
    )
    .unwrap();
    vdisk::cbt::enable(&disk).unwrap();
    let d = OpenOptions::new().write(true).open(&disk).unwrap();
    d.write_at(&pattern(1, 6 * MIB as usize), 2 * MIB).unwrap();
    d.close().unwrap();
    let pki = TlsPki::new(dir.path());
    let thumb = thumbprint(&pki.file("server-cert.pem"));
    let port = free_port();

    let server = serve(&disk, &pki, port);
    let full = dir.path().join("b1.vmdk");
    let p1 = pull(port, &thumb, &full, None);
    assert_eq!(p1.kind, "full");
    drop(server);
    assert_restores_to(&full, &disk);

    // The guest writes; the next backup takes only that, as a child of the first.
    let d = OpenOptions::new().write(true).open(&disk).unwrap();
    d.write_at(&pattern(2, MIB as usize), 40 * MIB).unwrap();
    d.write_at(&pattern(3, 4096), 3 * MIB).unwrap();
    d.close().unwrap();
    let server = serve(&disk, &pki, port);
    let incr = dir.path().join("b2.vmdk");
    let p2 = pull(port, &thumb, &incr, Some((&p1.change_id, &full)));
    assert_eq!(p2.kind, "incremental");
    assert_ne!(p2.change_id, p1.change_id);
    assert!(
        std::fs::metadata(&incr).unwrap().len() < std::fs::metadata(&full).unwrap().len(),
        "the incremental holds only the changes"
    );
    assert_restores_to(&incr, &disk);

    // A change ID the host cannot answer for: a full backup instead.
    let bogus = "0123456789abcdef0123456789abcdef/7";
    let again = dir.path().join("b3.vmdk");
    let p3 = pull(port, &thumb, &again, Some((bogus, &incr)));
    assert_eq!(p3.kind, "full-after-refused-change-id");
    assert_restores_to(&again, &disk);

    // A wrong thumbprint: refused at ConnectEx, nothing written.
    let wrong = thumb.replace(|c: char| c.is_ascii_hexdigit(), "0");
    let o = Command::new(proxy_bin())
        .args(["127.0.0.1", &port.to_string(), &wrong, "vm"])
        .arg(dir.path().join("b4.vmdk"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("VixDiskLib_ConnectEx"), "{err}");
    assert!(!dir.path().join("b4.vmdk").exists());
    drop(server);
}
