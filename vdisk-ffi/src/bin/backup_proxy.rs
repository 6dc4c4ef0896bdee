//! `backup_proxy`: the proxy of the README's main job (`./run-demo.sh`). It pulls a
//! backup of one disk from a host over libvixDiskLib's `nbdssl` transport - the
//! functions `libvixDiskLib.so.8` exports, called directly - with the host's
//! certificate pinned by its thumbprint, as backup software pins an ESXi host's:
//!
//! ```text
//! backup_proxy HOST PORT THUMBPRINT EXPORT OUT [SINCE PARENT]
//! ```
//!
//! Without SINCE it takes a full backup (QueryAllocatedBlocks); with SINCE (the
//! change ID of the previous backup) and PARENT (that backup) an incremental one
//! (VdiskExt_QueryChangedAreas) written as PARENT's child - or, if the host refuses
//! the change ID, a full backup. OUT is a streamOptimized disk. It prints
//! `key=value` lines: `mode`, `change_id` (of the disk as backed up), `kind`
//! (`full`, `incremental`, `full-after-refused-change-id`), `areas`, `bytes`,
//! `seconds`.

use std::ffi::{c_char, CStr, CString};
use std::path::Path;
use std::process::ExitCode;
use std::ptr;
use std::time::Instant;

use vdisk::ops::backup::write_backup;
use vdisk::{Error, ErrorKind, MapRange, RangeKind, VirtualDisk};
use vixDiskLib::api_cbt::{VdiskExt_GetChangeId, VdiskExt_QueryChangedAreas};
use vixDiskLib::api_io::{
    VixDiskLib_Close, VixDiskLib_FreeBlockList, VixDiskLib_FreeInfo, VixDiskLib_GetInfo,
    VixDiskLib_Open, VixDiskLib_QueryAllocatedBlocks, VixDiskLib_Read,
};
use vixDiskLib::api_lib::{
    VixDiskLib_ConnectEx, VixDiskLib_Disconnect, VixDiskLib_Exit, VixDiskLib_FreeErrorText,
    VixDiskLib_GetErrorText, VixDiskLib_GetTransportMode, VixDiskLib_Init,
};
use vixDiskLib::errors::VIX_OK;
use vixDiskLib::types::{
    VixDiskLibBlock, VixDiskLibBlockList, VixDiskLibConnectParams, VixDiskLibConnection,
    VixDiskLibHandle, VixDiskLibInfo, VixError, VIXDISKLIB_FLAG_OPEN_READ_ONLY,
};

type ProxyResult<T = ()> = Result<T, String>;

fn e(err: impl std::fmt::Display) -> String {
    err.to_string()
}

const SECTOR: u64 = 512;

/// The text of a VixError.
fn vix_text(code: VixError) -> String {
    // SAFETY: a NULL locale is allowed.
    let p = unsafe { VixDiskLib_GetErrorText(code, ptr::null()) };
    if p.is_null() {
        return format!("error {code}");
    }
    // SAFETY: a NUL-terminated string from the library, freed right after.
    let text = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    // SAFETY: it came from GetErrorText.
    unsafe { VixDiskLib_FreeErrorText(p) };
    format!("error {code}: {text}")
}

fn vix(code: VixError, what: &str) -> ProxyResult {
    if code == VIX_OK {
        Ok(())
    } else {
        Err(format!("{what}: {}", vix_text(code)))
    }
}

/// The proxy's view of the remote snapshot: a libvixDiskLib connection and disk
/// handle, read through `VixDiskLib_Read` (what the backup writer needs of a disk).
pub struct Proxy {
    conn: usize,
    handle: usize,
    capacity: u64,
    /// The transport mode the library reports.
    pub mode: String,
    /// The export.
    pub export: String,
}

impl Proxy {
    /// Connects to `host`:`port` with transport `nbdssl` and the host's
    /// `thumbprint`, and opens `export` read-only.
    pub fn connect(host: &str, port: u16, thumbprint: &str, export: &str) -> ProxyResult<Proxy> {
        // SAFETY: no log callbacks, no folders.
        let code = unsafe {
            VixDiskLib_Init(
                8,
                0,
                ptr::null_mut(),
                ptr::null_mut(),
                ptr::null_mut(),
                ptr::null(),
            )
        };
        vix(code, "VixDiskLib_Init")?;
        let server = CString::new(host).map_err(e)?;
        let thumb = CString::new(thumbprint).map_err(e)?;
        let vmx = CString::new("moref=vm-1001").map_err(e)?;
        let modes = CString::new("nbdssl").map_err(e)?;
        // SAFETY: all-zero is a valid (empty) parameter struct.
        let mut params: VixDiskLibConnectParams = unsafe { std::mem::zeroed() };
        params.serverName = server.as_ptr() as *mut c_char;
        params.thumbPrint = thumb.as_ptr() as *mut c_char;
        params.vmxSpec = vmx.as_ptr() as *mut c_char;
        params.nfcHostPort = u32::from(port);
        let mut conn: VixDiskLibConnection = ptr::null_mut();
        // SAFETY: a valid struct whose strings outlive the call; a valid out pointer.
        let code =
            unsafe { VixDiskLib_ConnectEx(&params, 1, ptr::null(), modes.as_ptr(), &mut conn) };
        vix(code, "VixDiskLib_ConnectEx")?;
        let path = CString::new(export).map_err(e)?;
        let mut handle: VixDiskLibHandle = ptr::null_mut();
        // SAFETY: an open connection, a NUL-terminated path, a valid out pointer.
        let opened = unsafe {
            VixDiskLib_Open(
                conn,
                path.as_ptr(),
                VIXDISKLIB_FLAG_OPEN_READ_ONLY,
                &mut handle,
            )
        };
        if let Err(err) = vix(opened, "VixDiskLib_Open") {
            VixDiskLib_Disconnect(conn);
            return Err(err);
        }
        let mut proxy = Proxy {
            conn: conn as usize,
            handle: handle as usize,
            capacity: 0,
            mode: String::new(),
            export: export.to_string(),
        };
        let mut info: *mut VixDiskLibInfo = ptr::null_mut();
        // SAFETY: an open handle, a valid out pointer.
        let code = unsafe { VixDiskLib_GetInfo(handle, &mut info) };
        vix(code, "VixDiskLib_GetInfo")?;
        // SAFETY: GetInfo succeeded: `info` is valid until FreeInfo.
        proxy.capacity = unsafe { (*info).capacity } * SECTOR;
        // SAFETY: it came from GetInfo.
        unsafe { VixDiskLib_FreeInfo(info) };
        let mode = VixDiskLib_GetTransportMode(handle);
        // SAFETY: a static NUL-terminated string (non-NULL for an open handle).
        proxy.mode = unsafe { CStr::from_ptr(mode) }
            .to_string_lossy()
            .into_owned();
        Ok(proxy)
    }

    fn handle(&self) -> VixDiskLibHandle {
        self.handle as VixDiskLibHandle
    }

    /// The disk's current change ID (`VdiskExt_GetChangeId`).
    pub fn change_id(&self) -> ProxyResult<String> {
        let mut id: *mut c_char = ptr::null_mut();
        // SAFETY: an open handle, a valid out pointer.
        let code = unsafe { VdiskExt_GetChangeId(self.handle(), &mut id) };
        vix(code, "VdiskExt_GetChangeId")?;
        // SAFETY: a malloc'd NUL-terminated string, freed right after.
        let s = unsafe { CStr::from_ptr(id) }.to_string_lossy().into_owned();
        // SAFETY: from malloc.
        unsafe { libc_free(id.cast()) };
        Ok(s)
    }

    /// Byte ranges of a block list, freed.
    fn take_list(list: *mut VixDiskLibBlockList) -> Vec<(u64, u64)> {
        // SAFETY: a list from the library: `numBlocks` entries from `blocks` on.
        let out = unsafe {
            let n = (*list).numBlocks as usize;
            let first = ptr::addr_of!((*list).blocks).cast::<VixDiskLibBlock>();
            (0..n)
                .map(|i| {
                    let b = &*first.add(i);
                    (b.offset * SECTOR, b.length * SECTOR)
                })
                .collect()
        };
        // SAFETY: it came from the library.
        unsafe { VixDiskLib_FreeBlockList(list) };
        out
    }

    /// What a full backup copies: `VixDiskLib_QueryAllocatedBlocks` over the disk,
    /// in 64 KiB chunks (the most sectors one call may cover, call after call).
    pub fn allocated(&self) -> ProxyResult<Vec<(u64, u64)>> {
        const CHUNK: u64 = 128;
        const PER_CALL: u64 = CHUNK * 524_288;
        let sectors = self.capacity / SECTOR;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut start = 0;
        while start < sectors {
            let n = (sectors - start).min(PER_CALL) / CHUNK * CHUNK;
            let mut list: *mut VixDiskLibBlockList = ptr::null_mut();
            // SAFETY: an open handle and a valid out pointer.
            let code = unsafe {
                VixDiskLib_QueryAllocatedBlocks(self.handle(), start, n, CHUNK, &mut list)
            };
            vix(code, "VixDiskLib_QueryAllocatedBlocks")?;
            for (o, l) in Self::take_list(list) {
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == o => last.1 += l,
                    _ => out.push((o, l)),
                }
            }
            start += n;
        }
        Ok(out)
    }

    /// What an incremental backup copies: `VdiskExt_QueryChangedAreas` since
    /// `since`. `Ok(None)`: the host refused the change ID (a full backup is due).
    pub fn changed(&self, since: &str) -> ProxyResult<Option<Vec<(u64, u64)>>> {
        let id = CString::new(since).map_err(e)?;
        let mut list: *mut VixDiskLibBlockList = ptr::null_mut();
        // SAFETY: an open handle, a NUL-terminated ID, a valid out pointer.
        let code = unsafe {
            VdiskExt_QueryChangedAreas(
                self.handle(),
                id.as_ptr(),
                0,
                self.capacity / SECTOR,
                &mut list,
            )
        };
        if code == ErrorKind::ChangeIdRefused.vix_code() {
            return Ok(None);
        }
        vix(code, "VdiskExt_QueryChangedAreas")?;
        Ok(Some(Self::take_list(list)))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        VixDiskLib_Close(self.handle());
        VixDiskLib_Disconnect(self.conn as VixDiskLibConnection);
    }
}

impl VirtualDisk for Proxy {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn is_writable(&self) -> bool {
        false
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> vdisk::Result<()> {
        let aligned = offset.is_multiple_of(SECTOR) && (buf.len() as u64).is_multiple_of(SECTOR);
        if !aligned {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "the proxy reads whole sectors",
            ));
        }
        // SAFETY: `buf` holds the sectors asked for.
        let code = unsafe {
            VixDiskLib_Read(
                self.handle(),
                offset / SECTOR,
                buf.len() as u64 / SECTOR,
                buf.as_mut_ptr(),
            )
        };
        if code == VIX_OK {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::Io, vix_text(code)))
        }
    }

    fn write_at(&self, _: &[u8], _: u64) -> vdisk::Result<()> {
        Err(Error::new(ErrorKind::ReadOnly, "the proxy only reads"))
    }

    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> vdisk::Result<()> {
        Err(Error::new(ErrorKind::ReadOnly, "the proxy only reads"))
    }

    fn flush(&self) -> vdisk::Result<()> {
        Ok(())
    }

    fn grain_bytes(&self) -> u64 {
        64 << 10
    }

    fn for_each_range(
        &self,
        offset: u64,
        len: u64,
        f: &mut dyn FnMut(MapRange) -> vdisk::Result<()>,
    ) -> vdisk::Result<()> {
        let len = len.min(self.capacity.saturating_sub(offset));
        f(MapRange {
            offset,
            length: len,
            kind: RangeKind::Data,
            depth: 0,
        })
    }

    fn change_id(&self) -> vdisk::Result<String> {
        Proxy::change_id(self).map_err(|m| Error::new(ErrorKind::Fail, m))
    }

    fn for_each_changed_area(
        &self,
        _: &str,
        _: u64,
        _: u64,
        _: &mut dyn FnMut(u64, u64) -> vdisk::Result<()>,
    ) -> vdisk::Result<()> {
        Err(Error::new(
            ErrorKind::NotSupported,
            "the demo asks through VdiskExt_QueryChangedAreas",
        ))
    }

    fn describe(&self) -> String {
        format!("{} over {}", self.export, self.mode)
    }
}

/// Pulls one backup (see the module documentation).
fn pull(args: &[String]) -> ProxyResult {
    let (host, port, thumbprint, export, out) = match args {
        [h, p, t, x, o] | [h, p, t, x, o, _, _] => (h, p, t, x, Path::new(o)),
        _ => {
            return Err("usage: backup_proxy HOST PORT THUMBPRINT EXPORT OUT [SINCE PARENT]".into())
        }
    };
    let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    let previous = args.get(5).zip(args.get(6).map(Path::new));
    let proxy = Proxy::connect(host, port, thumbprint, export)?;
    println!("mode={}", proxy.mode);
    let change_id = proxy.change_id()?;
    println!("change_id={change_id}");
    let start = Instant::now();
    let (kind, areas, parent) = match previous {
        None => ("full", proxy.allocated()?, None),
        Some((since, parent)) => match proxy.changed(since)? {
            Some(areas) => ("incremental", areas, Some(parent)),
            None => ("full-after-refused-change-id", proxy.allocated()?, None),
        },
    };
    let st = write_backup(&proxy, &areas, out, parent, &mut |_, _| true).map_err(e)?;
    println!("kind={kind}");
    println!("areas={}", areas.len());
    println!("bytes={}", st.bytes_read);
    println!("seconds={:.3}", start.elapsed().as_secs_f64());
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = pull(&args);
    VixDiskLib_Exit();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(m) => {
            eprintln!("backup_proxy: {m}");
            ExitCode::FAILURE
        }
    }
}

extern "C" {
    #[link_name = "free"]
    fn libc_free(p: *mut std::ffi::c_void);
}
