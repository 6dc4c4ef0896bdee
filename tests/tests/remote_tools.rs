//! `vdiskmanager info`, `map` and `convert` on NBD URIs: a disk served by the
//! `vdisk-nbd` program (plain on a Unix socket, and under TLS on TCP) is described,
//! mapped and converted as the same disk is locally - the converted copy equal to
//! the source for `qemu-img compare`, the map's data ranges equal to the local
//! map's - and a TLS server whose certificate is not trusted is a clear failure.
//! Trust comes from `VDISK_NBD_TLS_CA` or the URI's `tls-certificates=DIR`.

use std::path::Path;
use std::process::Command;

use vdisk::{create, CreateOptions, DiskType, OpenOptions};
use vdisk_interop::{
    free_port, path_str, pattern, qemu_data_ranges, require_tool_from, run, stdout_text, tempdir,
    vdiskmanager, vdiskmanager_bin, vdiskmanager_data_ranges, NbdServer, TlsPki, MIB,
};

/// A 96 MiB sparse disk with data in three places (one not grain-aligned).
fn make_disk(p: &Path) {
    create(p, &CreateOptions::new(DiskType::MonolithicSparse, 96 * MIB)).unwrap();
    let d = OpenOptions::new().write(true).open(p).unwrap();
    d.write_at(&pattern(1, 2 * MIB as usize), 0).unwrap();
    d.write_at(&pattern(2, 5000), 30 * MIB + 777).unwrap();
    d.write_at(&pattern(3, 4 * MIB as usize), 90 * MIB).unwrap();
    d.close().unwrap();
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_str(&stdout_text(out)).expect("JSON output")
}

fn data_ranges_of_uri(uri: &str) -> Vec<(u64, u64)> {
    let out = vdiskmanager(&["map", "--json", uri]);
    vdisk_interop::data_ranges_of_map_json(&stdout_text(&out))
}

#[test]
fn info_map_and_convert_read_an_export_as_the_local_disk() {
    let qemu_img = require_tool_from("qemu-img", "qemu-utils");
    let dir = tempdir();
    let disk = dir.path().join("src.vmdk");
    make_disk(&disk);
    let server = NbdServer::start(&["-r", "--export", &format!("vm={}", path_str(&disk))]);
    let uri = server.uri("vm");

    let info = json(&vdiskmanager(&["info", "--json", &uri]));
    assert_eq!(info["capacity"], 96 * MIB);
    assert_eq!(info["export"], "vm");
    assert_eq!(info["writable"], false);
    assert_eq!(info["tls"], false);
    let local = json(&vdiskmanager(&["info", "--json", path_str(&disk)]));
    assert_eq!(info["allocatedBytes"], local["allocatedBytes"]);

    assert_eq!(data_ranges_of_uri(&uri), vdiskmanager_data_ranges(&disk));
    assert_eq!(data_ranges_of_uri(&uri), qemu_data_ranges(&disk));

    for (fmt, name) in [("vmdk", "copy.vmdk"), ("raw", "copy.raw")] {
        let out = dir.path().join(name);
        vdiskmanager(&["convert", "-q", "-O", fmt, &uri, path_str(&out)]);
        let f = if fmt == "raw" { "raw" } else { "vmdk" };
        run(
            &qemu_img,
            &[
                "compare",
                "-f",
                "vmdk",
                "-F",
                f,
                path_str(&disk),
                path_str(&out),
            ],
        );
    }
    // A text info names what it read.
    let text = stdout_text(&vdiskmanager(&["info", &uri]));
    assert!(text.contains("Export:           vm"), "{text}");
    assert!(text.contains("read-only"), "{text}");
}

#[test]
fn a_tls_export_needs_a_trusted_certificate() {
    let dir = tempdir();
    let disk = dir.path().join("src.vmdk");
    make_disk(&disk);
    let pki = TlsPki::new(dir.path());
    let port = free_port();
    let mut args = vec![
        "-r".to_string(),
        "--export".into(),
        format!("vm={}", path_str(&disk)),
    ];
    args.extend(pki.server_args(false));
    let _server = NbdServer::start_tcp(port, &args);
    let uri = format!("nbds://localhost:{port}/vm");

    // Trusted through the CA: the same map as locally.
    let out = Command::new(vdiskmanager_bin())
        .args(["map", "--json", &uri])
        .env("VDISK_NBD_TLS_CA", pki.file("ca-cert.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        vdisk_interop::data_ranges_of_map_json(&stdout_text(&out)),
        vdiskmanager_data_ranges(&disk)
    );
    // Trusted through the URI's certificate folder, as libnbd and qemu name it.
    let out = Command::new(vdiskmanager_bin())
        .args([
            "info",
            "--json",
            &format!("{uri}?tls-certificates={}", pki.dir.display()),
        ])
        .env_remove("VDISK_NBD_TLS_CA")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json(&out)["tls"], true);
    // Not trusted (the system's CAs never signed it): refused, and said so.
    let out = Command::new(vdiskmanager_bin())
        .args(["info", &uri])
        .env_remove("VDISK_NBD_TLS_CA")
        .env_remove("VDISK_NBD_TLS_THUMBPRINT")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("certificate"), "{err}");
    // A plaintext URI to a TLS-requiring server: refused, naming TLS.
    let out = Command::new(vdiskmanager_bin())
        .args(["info", &format!("nbd://localhost:{port}/vm")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TLS"), "{err}");
}
