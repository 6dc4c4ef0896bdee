//! Disk arguments that name NBD exports: how the tools recognise and open them.

/// Whether a command-line disk argument is an NBD URI (the forms qemu-img and
/// libnbd take: `nbd://HOST[:PORT]/EXPORT`, `nbds://...`,
/// `nbd+unix:///EXPORT?socket=PATH`, `nbds+unix://...`).
pub fn is_nbd_uri(arg: &str) -> bool {
    let lower = arg.get(..12).unwrap_or(arg).to_ascii_lowercase();
    ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"]
        .iter()
        .any(|p| lower.starts_with(p))
}

/// The TLS settings of the tools' NBD connections, from the environment:
/// `VDISK_NBD_TLS_CA` (a PEM bundle to trust instead of the system's),
/// `VDISK_NBD_TLS_THUMBPRINT` (pin the server certificate's SHA-1 or SHA-256
/// fingerprint, `xx:xx:...`), `VDISK_NBD_TLS_CERT` and `VDISK_NBD_TLS_KEY` (a client
/// certificate). An `nbds` URI, or a thumbprint, requires TLS.
pub fn nbd_client_options(read_only: bool) -> vdisk_nbd::client::ClientOptions {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let client_cert = match (var("VDISK_NBD_TLS_CERT"), var("VDISK_NBD_TLS_KEY")) {
        (Some(c), Some(k)) => Some((c.into(), k.into())),
        _ => None,
    };
    vdisk_nbd::client::ClientOptions {
        ca_file: var("VDISK_NBD_TLS_CA").map(Into::into),
        thumbprint: var("VDISK_NBD_TLS_THUMBPRINT").map(|t| t.to_string_lossy().into_owned()),
        client_cert,
        read_only,
        ..vdisk_nbd::client::ClientOptions::default()
    }
}

/// Opens a disk argument: an NBD URI as a remote disk (see
/// [`nbd_client_options`]), anything else as a local disk read-only.
pub fn open_for_reading(arg: &std::path::Path) -> vdisk::Result<Box<dyn vdisk::VirtualDisk>> {
    match arg.to_str().filter(|a| is_nbd_uri(a)) {
        Some(uri) => Ok(Box::new(vdisk_nbd::client::RemoteDisk::open_uri(
            uri,
            &nbd_client_options(true),
        )?)),
        None => Ok(Box::new(vdisk::Disk::open(arg)?)),
    }
}
