//! Remote connections: libvixDiskLib's `nbd` and `nbdssl` transports over standard
//! NBD (not VMware's NFC protocol; see `shared/docs/nbd.md` §5 and the README).
//!
//! * ConnectEx with `serverName` set: the server is a host name or address (port
//!   from `nfcHostPort`, else `port`, else 10809), `unix:PATH` for a Unix socket, or
//!   an NBD URI (`nbd://`, `nbds://`, `nbd+unix:///?socket=`, `nbds+unix://...`).
//!   `thumbPrint` pins the server certificate and requires TLS. The transport modes
//!   asked for are tried in order: `nbdssl` (STARTTLS, refused if the server cannot)
//!   and `nbd` (plaintext, only when no thumbprint is given); others are skipped.
//!   The connection is probed at once (a listing of the exports), so a wrong host, a
//!   port that is not NBD or a wrong thumbprint fail here, before any disk is opened.
//! * Credentials (`credType`, `creds`), `vmxSpec` and the snapshot reference have no
//!   NBD equivalent: they are accepted, logged and not sent.
//! * Open: the path, verbatim, is the export name (`[datastore1] vm/vm.vmdk` as a
//!   `vdisk-nbd --datastore` server names its disks); one connection per handle.

use std::ffi::c_void;
use std::path::Path;
use std::sync::Arc;

use vdisk::{DiskInfo, ErrorKind, LinkInfo, VirtualDisk};
use vdisk_nbd::client::{
    parse_uri, ClientOptions, Endpoint, ReadSink, RemoteDisk, RemoteSpec, TlsPolicy,
};

use crate::errors::{VIX_E_INVALID_ARG, VIX_OK};
use crate::state::{DiskHandle, RemoteHandle, RemoteServer, SendPtr};
use crate::types::VixDiskLibCompletionCB;
use crate::FfiError;

/// The NBD port when the connection parameters give none.
pub(crate) const DEFAULT_PORT: u16 = 10809;

/// Transport modes tried when the caller names none (VDDK's default order, of
/// which these two are ours).
const DEFAULT_MODES: [&str; 2] = ["nbdssl", "nbd"];

/// What ConnectEx was given for a remote server.
pub struct ConnectRequest<'a> {
    /// `serverName`.
    pub server: &'a str,
    /// `port`.
    pub port: u32,
    /// `nfcHostPort`.
    pub nfc_port: u32,
    /// `thumbPrint` (None or empty: not pinned).
    pub thumbprint: Option<&'a str>,
    /// ConnectEx's `transportModes` (None: the default order).
    pub modes: Option<&'a str>,
    /// ConnectEx's `readOnly`.
    pub read_only: bool,
}

/// Where `req` points: the endpoint, and whether its URI asked for TLS.
fn endpoint_of(req: &ConnectRequest<'_>) -> Result<(Endpoint, bool), FfiError> {
    let server = req.server.trim();
    if server.is_empty() {
        return Err(FfiError::new(VIX_E_INVALID_ARG, "serverName is empty"));
    }
    if server.contains("://") {
        let uri = parse_uri(server)?;
        return Ok((uri.endpoint, uri.tls));
    }
    if let Some(path) = server.strip_prefix("unix:") {
        return Ok((Endpoint::Unix(path.into()), false));
    }
    let port = [req.nfc_port, req.port]
        .into_iter()
        .find(|&p| p != 0)
        .map_or(Ok(DEFAULT_PORT), |p| {
            u16::try_from(p).map_err(|_| {
                FfiError::new(VIX_E_INVALID_ARG, format!("port {p} is not a TCP port"))
            })
        })?;
    // An IPv6 address may come bracketed, as in URIs.
    let host = server
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(server);
    Ok((
        Endpoint::Tcp {
            host: host.to_string(),
            port,
        },
        false,
    ))
}

/// The transport modes to try, in order, from ConnectEx's list.
fn modes_of(list: Option<&str>) -> Vec<&'static str> {
    match list.map(str::trim).filter(|l| !l.is_empty()) {
        None => DEFAULT_MODES.to_vec(),
        Some(l) => l
            .split(':')
            .filter_map(|m| match m.trim().to_ascii_lowercase().as_str() {
                "nbdssl" => Some("nbdssl"),
                "nbd" => Some("nbd"),
                _ => None,
            })
            .collect(),
    }
}

/// Connects to a remote server (see the module documentation): the first mode
/// that works.
pub fn connect(req: &ConnectRequest<'_>) -> Result<RemoteServer, FfiError> {
    let (endpoint, uri_tls) = endpoint_of(req)?;
    let thumbprint = req
        .thumbprint
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string);
    let mut modes = modes_of(req.modes);
    if thumbprint.is_some() || uri_tls {
        // A pinned certificate or an nbds URI: never plaintext.
        modes.retain(|m| *m == "nbdssl");
    }
    if modes.is_empty() {
        return Err(FfiError::new(
            crate::errors::VIX_E_NOT_SUPPORTED,
            format!(
                "none of the transport modes \"{}\" can reach {}: this library offers \
                 nbdssl and nbd (standard NBD), and nbd only without a thumbprint",
                req.modes.unwrap_or(""),
                req.server
            ),
        ));
    }
    let mut last: Option<vdisk::Error> = None;
    for mode in modes {
        let options = ClientOptions {
            tls: if mode == "nbdssl" {
                TlsPolicy::Require
            } else {
                TlsPolicy::Off
            },
            thumbprint: thumbprint.clone(),
            read_only: req.read_only,
            // One connection per disk handle, as VDDK's nbd transport has (and
            // shared/docs/nbd.md §5): as fast over a Unix socket as four
            // multi-conn connections, faster over TCP, and a quarter of the
            // server's connections when a proxy opens many disks at once.
            connections: 1,
            ..ClientOptions::default()
        };
        match RemoteDisk::probe(&endpoint, &options) {
            Ok(()) => {
                crate::log::log(&format!(
                    "VixDiskLib: connected to {} with transport {mode}",
                    req.server
                ));
                return Ok(RemoteServer {
                    endpoint,
                    options,
                    mode,
                    name: req.server.to_string(),
                });
            }
            Err(e) => {
                crate::log::warn(&format!(
                    "VixDiskLib: transport {mode} to {}: {e}",
                    req.server
                ));
                // Refused for its TLS choice (TLS not offered, or required): the
                // next mode may do; a server that cannot be reached will not.
                let next = e.kind() == ErrorKind::AccessDenied;
                last = Some(e);
                if !next {
                    break;
                }
            }
        }
    }
    let e = last.unwrap_or_else(|| vdisk::Error::new(ErrorKind::Fail, "no transport mode"));
    Err(FfiError::new(
        e.kind().vix_code(),
        format!("cannot connect to {}: {e}", req.server),
    ))
}

/// How the disk `path` of a remote connection is reached: the connection's server
/// and options, the path verbatim as the export name (as [`open`] maps it).
pub fn spec_of(server: &RemoteServer, path: &Path) -> RemoteSpec {
    RemoteSpec {
        endpoint: server.endpoint.clone(),
        export: path.to_string_lossy().into_owned(),
        options: server.options.clone(),
    }
}

/// Opens `path` (the export name) on a remote connection.
pub fn open(
    server: &RemoteServer,
    path: &Path,
    flags: u32,
    read_only: bool,
    connection: u64,
) -> Result<DiskHandle, FfiError> {
    use crate::types::{VIXDISKLIB_FLAG_OPEN_READ_ONLY, VIXDISKLIB_FLAG_OPEN_SINGLE_LINK};
    if flags & VIXDISKLIB_FLAG_OPEN_SINGLE_LINK != 0 {
        return Err(FfiError::new(
            crate::errors::VIX_E_NOT_SUPPORTED,
            "VIXDISKLIB_FLAG_OPEN_SINGLE_LINK: a remote disk is served as one disk, its \
             links cannot be opened one by one",
        ));
    }
    let spec = spec_of(server, path);
    let spec = spec.read_only(read_only || spec.options.read_only);
    let export = &spec.export;
    let disk = spec.open().map_err(|e| {
        FfiError::new(
            e.kind().vix_code(),
            format!(
                "Cannot open disk {export} on {} (transport {}): {e}",
                server.name, server.mode
            ),
        )
    })?;
    let read_only = read_only || !disk.is_writable();
    let flags = if read_only {
        flags | VIXDISKLIB_FLAG_OPEN_READ_ONLY
    } else {
        flags
    };
    Ok(DiskHandle::new_remote(
        path.to_path_buf(),
        connection,
        flags,
        RemoteHandle {
            disk,
            mode: server.mode,
        },
    ))
}

/// Opens the export `path` names, read-only, as the source of a Clone.
pub fn open_source(server: &RemoteServer, path: &Path) -> Result<RemoteDisk, FfiError> {
    let export = path.to_string_lossy();
    let options = ClientOptions {
        read_only: true,
        ..server.options.clone()
    };
    RemoteDisk::open(&server.endpoint, &export, &options).map_err(|e| {
        FfiError::new(
            e.kind().vix_code(),
            format!(
                "Cannot open disk {export} on {} (transport {}): {e}",
                server.name, server.mode
            ),
        )
    })
}

/// What GetInfo reports for a remote disk: the export's size; no descriptor, so
/// the geometry VMware gives a new disk of that size, no UUID, one link.
pub fn info(disk: &RemoteDisk) -> DiskInfo {
    let capacity = disk.capacity();
    let geometry = vdisk::Geometry::for_new_disk(capacity / 512, vdisk::AdapterType::LsiLogic);
    DiskInfo {
        capacity,
        disk_type: None,
        create_type: "nbd".into(),
        adapter_type: Some("lsilogic".into()),
        hw_version: None,
        geometry: Some(geometry),
        bios_geometry: None,
        uuid: None,
        cid: None,
        parent_cid: None,
        allocated_bytes: None,
        file_bytes: 0,
        chain: vec![LinkInfo {
            path: disk.export_name().into(),
            create_type: "nbd".into(),
            cid: None,
            parent_cid: None,
            parent_file_name_hint: None,
            extents: Vec::new(),
        }],
        warnings: Vec::new(),
    }
}

/// The sector sizes GetInfo reports for a remote disk: logical 4096 if that is the
/// server's minimum block, physical 4096 if its preferred block is at least that.
pub fn sector_sizes(disk: &RemoteDisk) -> (u32, u32) {
    let (minimum, preferred, _) = disk.block_sizes();
    let logical = if minimum >= 4096 { 4096 } else { 512 };
    let physical = if preferred >= 4096 { 4096 } else { 512 };
    (logical, physical)
}

/// Queues an asynchronous read or write of a remote disk: sent at once, pipelined
/// with the others (a read's data goes straight into the caller's buffer); the
/// callback runs once, on the connection's reader thread.
#[allow(clippy::too_many_arguments)]
pub fn submit(
    h: &std::sync::Arc<DiskHandle>,
    name: &'static str,
    start: u64,
    count: u64,
    buffer: usize,
    callback: VixDiskLibCompletionCB,
    data: usize,
    write: bool,
) -> Result<(), FfiError> {
    let Some(remote) = &h.remote else {
        return Err(FfiError::new(VIX_E_INVALID_ARG, "not a remote disk"));
    };
    let offset = start * 512;
    let len = usize::try_from(count * 512)
        .map_err(|_| FfiError::new(VIX_E_INVALID_ARG, "request too large"))?;
    let done_handle = std::sync::Arc::clone(h);
    let (buf, cb_data) = (SendPtr(buffer), SendPtr(data));
    let finish = move |result: Result<(), FfiError>| {
        let code = match result {
            Ok(()) => VIX_OK,
            Err(e) => {
                crate::log::warn(&format!("{name}: {}", e.message));
                e.code
            }
        };
        if let Some(cb) = callback {
            // SAFETY: the client's completion callback and its data pointer,
            // called once, as VDDK does.
            unsafe { cb(cb_data.0 as *mut c_void, code) };
        }
        done_handle.complete_one();
    };
    h.begin_one();
    if write {
        // SAFETY: the caller guarantees `buffer` holds `count * 512` readable bytes
        // until the callback runs; they are copied now.
        let data = unsafe { std::slice::from_raw_parts(buffer as *const u8, len) }.to_vec();
        remote.disk.write_async(
            offset,
            data,
            false,
            Box::new(move |r| finish(r.map_err(FfiError::from))),
        );
    } else {
        // The data goes from the socket straight into the caller's buffer.
        remote.disk.read_async_into(
            offset,
            len,
            Arc::new(CBuffer { ptr: buf.0, len }),
            Box::new(move |r| finish(r.map_err(FfiError::from))),
        );
    }
    Ok(())
}

/// A synchronous read of a remote disk: `len` bytes at `offset` straight into
/// the caller's `buffer`, waited for.
pub fn read(h: &DiskHandle, offset: u64, len: usize, buffer: usize) -> Result<(), FfiError> {
    let Some(remote) = &h.remote else {
        return Err(FfiError::new(VIX_E_INVALID_ARG, "not a remote disk"));
    };
    if len == 0 {
        return Ok(());
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    remote.disk.read_async_into(
        offset,
        len,
        Arc::new(CBuffer { ptr: buffer, len }),
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    let r = rx.recv().unwrap_or_else(|_| {
        Err(vdisk::Error::new(
            ErrorKind::ConnectionLost,
            "the read's completion was lost",
        ))
    });
    Ok(r?)
}

/// A C caller's read buffer, lent to the NBD client: the data of the read goes
/// straight into it.
struct CBuffer {
    ptr: usize,
    len: usize,
}

impl ReadSink for CBuffer {
    fn with_slice(
        &self,
        at: usize,
        len: usize,
        f: &mut dyn FnMut(&mut [u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        if at.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(std::io::Error::other(format!(
                "{len} bytes at {at} are outside the {}-byte read buffer",
                self.len
            )));
        }
        // SAFETY: the caller of Read/ReadAsync guarantees that the buffer holds
        // `self.len` writable bytes until the read completes (its callback runs,
        // or Read returns); the client lends slices of it only before that, and
        // the pieces of one read - the only ones that may be lent at once, from
        // different connections - are disjoint.
        let slice = unsafe { std::slice::from_raw_parts_mut((self.ptr as *mut u8).add(at), len) };
        f(slice)
    }
}
