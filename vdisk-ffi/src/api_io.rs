//! Opening disks and doing I/O: Open/Close, GetInfo, Read/Write and their
//! asynchronous forms, Flush, metadata, allocated blocks.
#![allow(non_snake_case)]

use std::ffi::{c_char, c_int, c_void};
use std::sync::Arc;

use vdisk::{OpenOptions, RangeKind, VirtualDisk};

use crate::async_pool::Span;
use crate::errors::{
    VIX_ASYNC, VIX_E_BUFFER_TOOSMALL, VIX_E_DISK_OUTOFRANGE, VIX_E_INVALID_ARG,
    VIX_E_OUT_OF_MEMORY, VIX_OK,
};
use crate::state::{self, DiskHandle, SendPtr};
use crate::types::*;
use crate::{c_path, c_str, guard, malloc_str, ok, FfiError};

const SECTOR: u64 = 512;

/// Opens the disk at `path` (descriptor or monolithic file; absolute or relative to
/// the current folder) through `connection`, with VDDK open flags.
///
/// # Safety
/// `path` must be NUL-terminated; `diskHandle` a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Open(
    connection: VixDiskLibConnection,
    path: *const c_char,
    flags: uint32,
    diskHandle: *mut VixDiskLibHandle,
) -> VixError {
    guard("VixDiskLib_Open", || {
        if diskHandle.is_null() {
            return Err(FfiError::new(VIX_E_INVALID_ARG, "diskHandle is NULL"));
        }
        // SAFETY: non-NULL out pointer given by the caller: NULL until success.
        unsafe { *diskHandle = std::ptr::null_mut() };
        let (conn_id, conn) = state::connection(connection as usize)?;
        // SAFETY: per the contract.
        let path = unsafe { c_path(path, "path") }?;
        let read_only = flags & VIXDISKLIB_FLAG_OPEN_READ_ONLY != 0 || conn.read_only;
        if let Some(server) = &conn.remote {
            let h = crate::remote::open(server, &path, flags, read_only, conn_id)?;
            let handle = state::add_disk(h);
            // SAFETY: non-NULL out pointer given by the caller.
            unsafe { *diskHandle = handle as VixDiskLibHandle };
            return ok();
        }
        let options = OpenOptions::new()
            .write(!read_only)
            .single_link(flags & VIXDISKLIB_FLAG_OPEN_SINGLE_LINK != 0)
            // Unbuffered: every flush reaches the disk (the default too).
            .sync(true);
        let disk = options.open(&path).map_err(|e| {
            FfiError::new(
                e.kind().vix_code(),
                format!("Cannot open disk {}: {e}", path.display()),
            )
        })?;
        let flags = if read_only {
            flags | VIXDISKLIB_FLAG_OPEN_READ_ONLY
        } else {
            flags
        };
        let handle = state::add_disk(DiskHandle::new(path, conn_id, flags, options, disk));
        // SAFETY: non-NULL out pointer given by the caller.
        unsafe { *diskHandle = handle as VixDiskLibHandle };
        ok()
    })
}

/// Closes a disk handle (waiting for its asynchronous operations first).
#[no_mangle]
pub extern "C" fn VixDiskLib_Close(diskHandle: VixDiskLibHandle) -> VixError {
    guard("VixDiskLib_Close", || {
        let h = state::remove_disk(diskHandle as usize)?;
        Ok(state::close_handle(&h))
    })
}

fn adapter_code(name: Option<&str>) -> VixDiskLibAdapterType {
    name.and_then(|n| n.parse::<vdisk::AdapterType>().ok())
        .map_or(VIXDISKLIB_ADAPTER_UNKNOWN, vdisk::AdapterType::vddk_code)
}

fn geometry(g: Option<vdisk::Geometry>) -> VixDiskLibGeometry {
    g.map(|g| VixDiskLibGeometry {
        cylinders: g.cylinders,
        heads: g.heads,
        sectors: g.sectors,
    })
    .unwrap_or_default()
}

/// Capacity, geometry, adapter, chain length, parent name and UUID, in a struct from
/// `malloc` to free with FreeInfo.
///
/// # Safety
/// `info` must be a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_GetInfo(
    diskHandle: VixDiskLibHandle,
    info: *mut *mut VixDiskLibInfo,
) -> VixError {
    guard("VixDiskLib_GetInfo", || {
        if info.is_null() {
            return Err(FfiError::new(VIX_E_INVALID_ARG, "info is NULL"));
        }
        // SAFETY: non-NULL out pointer given by the caller: NULL until success.
        unsafe { *info = std::ptr::null_mut() };
        let h = state::disk(diskHandle as usize)?;
        let (i, sectors) = match &h.remote {
            Some(r) => (
                crate::remote::info(&r.disk),
                crate::remote::sector_sizes(&r.disk),
            ),
            None => (h.with_disk(|d| Ok(d.info()?))?, (512, 512)),
        };
        for w in &i.warnings {
            crate::log::warn(&format!("VixDiskLib_GetInfo: {w}"));
        }
        let phys = geometry(i.geometry);
        let bios = match i.bios_geometry {
            Some(g) => geometry(Some(g)),
            None => phys,
        };
        let parent = match i
            .chain
            .first()
            .and_then(|l| l.parent_file_name_hint.clone())
        {
            Some(p) => malloc_str(&p)?,
            None => std::ptr::null_mut(),
        };
        let uuid = match &i.uuid {
            Some(u) => malloc_str(u)?,
            None => std::ptr::null_mut(),
        };
        // SAFETY: allocating one struct; checked for NULL below.
        let p = unsafe { libc::calloc(1, std::mem::size_of::<VixDiskLibInfo>()) }
            as *mut VixDiskLibInfo;
        if p.is_null() {
            // SAFETY: both are malloc'd or NULL.
            unsafe {
                libc::free(parent as *mut c_void);
                libc::free(uuid as *mut c_void);
            }
            return Err(FfiError::new(VIX_E_OUT_OF_MEMORY, "out of memory"));
        }
        let value = VixDiskLibInfo {
            biosGeo: bios,
            physGeo: phys,
            capacity: i.capacity / SECTOR,
            adapterType: adapter_code(i.adapter_type.as_deref()),
            numLinks: c_int::try_from(i.chain.len()).unwrap_or(c_int::MAX),
            parentFileNameHint: parent,
            uuid,
            logicalSectorSize: sectors.0,
            physicalSectorSize: sectors.1,
        };
        // SAFETY: `p` is a fresh allocation of the struct's size and alignment
        // (malloc aligns for any type); `info` is a valid out pointer.
        unsafe {
            p.write(value);
            *info = p;
        }
        ok()
    })
}

/// Frees what GetInfo returned (NULL is allowed).
///
/// # Safety
/// `info` must be NULL or come from GetInfo.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_FreeInfo(info: *mut VixDiskLibInfo) {
    if info.is_null() {
        return;
    }
    // SAFETY: `info` came from GetInfo: its strings and itself are malloc'd (or NULL).
    unsafe {
        libc::free((*info).parentFileNameHint as *mut c_void);
        libc::free((*info).uuid as *mut c_void);
        libc::free(info as *mut c_void);
    }
}

/// Checks a sector range and returns it in bytes.
fn byte_range(d: &dyn VirtualDisk, start: u64, count: u64) -> Result<(u64, usize), FfiError> {
    let off = start.checked_mul(SECTOR);
    let len = count.checked_mul(SECTOR);
    match (off, len) {
        (Some(off), Some(len)) if off.checked_add(len).is_some_and(|e| e <= d.capacity()) => {
            let len = usize::try_from(len)
                .map_err(|_| FfiError::new(VIX_E_INVALID_ARG, "request too large"))?;
            Ok((off, len))
        }
        _ => Err(FfiError::new(
            VIX_E_DISK_OUTOFRANGE,
            format!(
                "sectors {start}..{} are beyond the end of the disk ({} sectors)",
                start.saturating_add(count),
                d.capacity() / SECTOR
            ),
        )),
    }
}

fn do_read(h: &DiskHandle, start: u64, count: u64, buf: usize) -> Result<(), FfiError> {
    if h.remote.is_some() {
        // Straight into the caller's buffer.
        let (off, len) = h.with_virtual(|d| byte_range(d, start, count))?;
        return crate::remote::read(h, off, len, buf);
    }
    h.with_virtual(|d| {
        let (off, len) = byte_range(d, start, count)?;
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the caller guarantees `buf` points to `count * 512` writable bytes
        // that stay valid (for async reads, until the completion callback).
        let out = unsafe { std::slice::from_raw_parts_mut(buf as *mut u8, len) };
        Ok(d.read_at(out, off)?)
    })
}

fn do_write(h: &DiskHandle, start: u64, count: u64, buf: usize) -> Result<(), FfiError> {
    h.with_virtual(|d| {
        let (off, len) = byte_range(d, start, count)?;
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the caller guarantees `buf` points to `count * 512` readable bytes
        // that stay valid (for async writes, until the completion callback).
        let data = unsafe { std::slice::from_raw_parts(buf as *const u8, len) };
        Ok(d.write_at(data, off)?)
    })
}

/// Reads `numSectors` sectors from `startSector`.
///
/// # Safety
/// `readBuffer` must hold `numSectors * 512` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Read(
    diskHandle: VixDiskLibHandle,
    startSector: VixDiskLibSectorType,
    numSectors: VixDiskLibSectorType,
    readBuffer: *mut uint8,
) -> VixError {
    guard("VixDiskLib_Read", || {
        let h = state::disk(diskHandle as usize)?;
        if readBuffer.is_null() && numSectors > 0 {
            return Err(FfiError::new(VIX_E_INVALID_ARG, "readBuffer is NULL"));
        }
        do_read(&h, startSector, numSectors, readBuffer as usize)?;
        ok()
    })
}

/// Writes `numSectors` sectors at `startSector`.
///
/// # Safety
/// `writeBuffer` must hold `numSectors * 512` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Write(
    diskHandle: VixDiskLibHandle,
    startSector: VixDiskLibSectorType,
    numSectors: VixDiskLibSectorType,
    writeBuffer: *const uint8,
) -> VixError {
    guard("VixDiskLib_Write", || {
        let h = state::disk(diskHandle as usize)?;
        if writeBuffer.is_null() && numSectors > 0 {
            return Err(FfiError::new(VIX_E_INVALID_ARG, "writeBuffer is NULL"));
        }
        do_write(&h, startSector, numSectors, writeBuffer as usize)?;
        ok()
    })
}

/// One asynchronous request.
struct Request {
    start: u64,
    count: u64,
    buffer: usize,
    callback: VixDiskLibCompletionCB,
    data: usize,
}

fn submit(name: &'static str, diskHandle: VixDiskLibHandle, req: Request, write: bool) -> VixError {
    guard(name, || {
        let h: Arc<DiskHandle> = state::disk(diskHandle as usize)?;
        if req.buffer == 0 && req.count > 0 {
            return Err(FfiError::new(VIX_E_INVALID_ARG, "buffer is NULL"));
        }
        // Range errors are reported now: the operation is then not queued and the
        // callback never runs (clients rely on that).
        h.with_virtual(|d| byte_range(d, req.start, req.count).map(drop))?;
        if h.remote.is_some() {
            crate::remote::submit(
                &h,
                name,
                req.start,
                req.count,
                req.buffer,
                req.callback,
                req.data,
                write,
            )?;
            return Ok(VIX_ASYNC);
        }
        let op = if write { do_write } else { do_read };
        let data = SendPtr(req.data);
        let buf = SendPtr(req.buffer);
        let (start, count, callback) = (req.start, req.count, req.callback);
        let worker = h.clone();
        let span = Span {
            start: start.saturating_mul(SECTOR),
            end: start.saturating_add(count).saturating_mul(SECTOR),
            write,
        };
        h.submit(
            span,
            Box::new(move || {
                let result =
                    crate::guard(name, || op(&worker, start, count, buf.0).map(|()| VIX_OK));
                if let Some(cb) = callback {
                    // SAFETY: the client's completion callback and its data pointer,
                    // called once, as VDDK does.
                    unsafe { cb(data.0 as *mut c_void, result) };
                }
                worker.complete_one();
            }),
        )?;
        Ok(VIX_ASYNC)
    })
}

/// Queues a read; returns `VIX_ASYNC` when queued. The callback runs once, on the
/// handle's I/O thread, with the result.
///
/// # Safety
/// `readBuffer` must hold `numSectors * 512` writable bytes until the callback runs.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_ReadAsync(
    diskHandle: VixDiskLibHandle,
    startSector: VixDiskLibSectorType,
    numSectors: VixDiskLibSectorType,
    readBuffer: *mut uint8,
    callback: VixDiskLibCompletionCB,
    cbData: *mut c_void,
) -> VixError {
    let req = Request {
        start: startSector,
        count: numSectors,
        buffer: readBuffer as usize,
        callback,
        data: cbData as usize,
    };
    submit("VixDiskLib_ReadAsync", diskHandle, req, false)
}

/// Queues a write; returns `VIX_ASYNC` when queued. The callback runs once, on the
/// handle's I/O thread, with the result.
///
/// # Safety
/// `writeBuffer` must hold `numSectors * 512` readable bytes until the callback runs.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_WriteAsync(
    diskHandle: VixDiskLibHandle,
    startSector: VixDiskLibSectorType,
    numSectors: VixDiskLibSectorType,
    writeBuffer: *const uint8,
    callback: VixDiskLibCompletionCB,
    cbData: *mut c_void,
) -> VixError {
    let req = Request {
        start: startSector,
        count: numSectors,
        buffer: writeBuffer as usize,
        callback,
        data: cbData as usize,
    };
    submit("VixDiskLib_WriteAsync", diskHandle, req, true)
}

/// Waits until every queued operation on the handle has completed.
#[no_mangle]
pub extern "C" fn VixDiskLib_Wait(diskHandle: VixDiskLibHandle) -> VixError {
    guard("VixDiskLib_Wait", || {
        state::disk(diskHandle as usize)?.wait();
        ok()
    })
}

/// Writes back metadata and makes written data durable (fsync).
#[no_mangle]
pub extern "C" fn VixDiskLib_Flush(diskHandle: VixDiskLibHandle) -> VixError {
    guard("VixDiskLib_Flush", || {
        let h = state::disk(diskHandle as usize)?;
        if h.remote.is_some() {
            // Acknowledged means written: wait for what is in flight first.
            h.wait();
        }
        h.with_virtual(|d| Ok(d.flush()?))?;
        ok()
    })
}

/// Copies `value` and its NUL into `buf` if it fits; sets `*required`.
///
/// # Safety
/// `buf` must be NULL or hold `len` bytes; `required` NULL or valid.
unsafe fn give_bytes(
    value: &[u8],
    buf: *mut c_char,
    len: usize,
    required: *mut usize,
) -> Result<VixError, FfiError> {
    let need = value.len() + 1;
    if !required.is_null() {
        // SAFETY: valid out pointer per the contract.
        unsafe { *required = need };
    }
    if buf.is_null() || len < need {
        return Ok(VIX_E_BUFFER_TOOSMALL);
    }
    // SAFETY: `buf` holds at least `need` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(value.as_ptr(), buf as *mut u8, value.len());
        *buf.add(value.len()) = 0;
    }
    Ok(VIX_OK)
}

/// Reads a disk database entry (key without `ddb.`). With a NULL or small buffer,
/// returns `VIX_E_BUFFER_TOOSMALL` and the size needed (with the NUL).
///
/// # Safety
/// `key` NUL-terminated; `buf` NULL or `bufLen` bytes; `requiredLen` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_ReadMetadata(
    diskHandle: VixDiskLibHandle,
    key: *const c_char,
    buf: *mut c_char,
    bufLen: usize,
    requiredLen: *mut usize,
) -> VixError {
    guard("VixDiskLib_ReadMetadata", || {
        let h = state::disk(diskHandle as usize)?;
        // SAFETY: per the contract.
        let key = unsafe { c_str(key, "key") }?.to_string_lossy().into_owned();
        let value = h.with_disk(|d| Ok(d.metadata(&key)?))?;
        // SAFETY: per the contract.
        unsafe { give_bytes(value.as_bytes(), buf, bufLen, requiredLen) }
    })
}

/// Creates or changes a disk database entry.
///
/// # Safety
/// `key` and `val` NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_WriteMetadata(
    diskHandle: VixDiskLibHandle,
    key: *const c_char,
    val: *const c_char,
) -> VixError {
    guard("VixDiskLib_WriteMetadata", || {
        let h = state::disk(diskHandle as usize)?;
        // SAFETY: per the contract.
        let key = unsafe { c_str(key, "key") }?.to_string_lossy().into_owned();
        // SAFETY: per the contract.
        let val = unsafe { c_str(val, "val") }?.to_string_lossy().into_owned();
        h.with_disk(|d| Ok(d.set_metadata(&key, &val)?))?;
        ok()
    })
}

/// Every key, as consecutive NUL-terminated strings followed by one more NUL; same
/// size-probe protocol as ReadMetadata.
///
/// # Safety
/// `keys` NULL or `maxLen` bytes; `requiredLen` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_GetMetadataKeys(
    diskHandle: VixDiskLibHandle,
    keys: *mut c_char,
    maxLen: usize,
    requiredLen: *mut usize,
) -> VixError {
    guard("VixDiskLib_GetMetadataKeys", || {
        let h = state::disk(diskHandle as usize)?;
        let list = h.with_disk(|d| Ok(d.metadata_keys()?))?;
        let mut bytes = Vec::new();
        for k in list {
            bytes.extend_from_slice(k.as_bytes());
            bytes.push(0);
        }
        // SAFETY: per the contract (give_bytes adds the final NUL).
        unsafe { give_bytes(&bytes, keys, maxLen, requiredLen) }
    })
}

/// The allocated chunks of `[startSector, startSector + numSectors)`, `chunkSize`
/// sectors each, merged into blocks (sorted, inside the range; a request past the
/// end of the disk is clipped to it). `startSector` and `numSectors` must be
/// multiples of `chunkSize` (128 to 131072 sectors), at most 524288 chunks per call. The list comes from `malloc`: free it with
/// FreeBlockList (or `free`).
///
/// # Safety
/// `blockList` must be a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_QueryAllocatedBlocks(
    diskHandle: VixDiskLibHandle,
    startSector: VixDiskLibSectorType,
    numSectors: VixDiskLibSectorType,
    chunkSize: VixDiskLibSectorType,
    blockList: *mut *mut VixDiskLibBlockList,
) -> VixError {
    guard("VixDiskLib_QueryAllocatedBlocks", || {
        if blockList.is_null() {
            return Err(FfiError::new(VIX_E_INVALID_ARG, "blockList is NULL"));
        }
        // SAFETY: non-NULL out pointer given by the caller: NULL until success.
        unsafe { *blockList = std::ptr::null_mut() };
        if !(VIXDISKLIB_MIN_CHUNK_SIZE..=VIXDISKLIB_MAX_CHUNK_SIZE).contains(&chunkSize) {
            return Err(FfiError::new(
                VIX_E_INVALID_ARG,
                format!(
                    "chunkSize {chunkSize} is outside {VIXDISKLIB_MIN_CHUNK_SIZE}..={VIXDISKLIB_MAX_CHUNK_SIZE} sectors"
                ),
            ));
        }
        if !startSector.is_multiple_of(chunkSize) || !numSectors.is_multiple_of(chunkSize) {
            return Err(FfiError::new(
                VIX_E_INVALID_ARG,
                format!(
                    "startSector {startSector} and numSectors {numSectors} must be multiples of chunkSize {chunkSize}"
                ),
            ));
        }
        if numSectors / chunkSize > VIXDISKLIB_MAX_CHUNK_NUMBER {
            return Err(FfiError::new(
                VIX_E_INVALID_ARG,
                format!("more than {VIXDISKLIB_MAX_CHUNK_NUMBER} chunks in one query"),
            ));
        }
        let h = state::disk(diskHandle as usize)?;
        let blocks = h.with_virtual(|d| {
            let cap = d.capacity() / SECTOR;
            let start = startSector.min(cap);
            let end = startSector.saturating_add(numSectors).min(cap);
            let mut out: Vec<VixDiskLibBlock> = Vec::new();
            d.for_each_range(start * SECTOR, (end - start) * SECTOR, &mut |r| {
                if r.kind != RangeKind::Data {
                    return Ok(());
                }
                // Round out to chunks, relative to the query's start.
                let s = r.offset / SECTOR;
                let e = (r.offset + r.length).div_ceil(SECTOR);
                let cs = start + (s - start) / chunkSize * chunkSize;
                let ce = (start + (e - start).div_ceil(chunkSize) * chunkSize).min(end);
                match out.last_mut() {
                    Some(b) if b.offset + b.length >= cs => {
                        b.length = b.length.max(ce - b.offset);
                    }
                    _ => out.push(VixDiskLibBlock {
                        offset: cs,
                        length: ce - cs,
                    }),
                }
                Ok(())
            })?;
            Ok(out)
        })?;
        block_list_out(blocks, blockList)
    })
}

/// Hands `blocks` to C as a `malloc`'d `VixDiskLibBlockList` in `*out` (freed with
/// FreeBlockList).
pub(crate) fn block_list_out(
    blocks: Vec<VixDiskLibBlock>,
    out: *mut *mut VixDiskLibBlockList,
) -> Result<VixError, FfiError> {
    let n = blocks.len();
    let count = u32::try_from(n)
        .map_err(|_| FfiError::new(VIX_E_OUT_OF_MEMORY, "too many blocks for one list"))?;
    let bytes = 8 + 16 * n.max(1);
    // SAFETY: allocating the header and `n` entries; checked for NULL below.
    let p = unsafe { libc::calloc(1, bytes) } as *mut VixDiskLibBlockList;
    if p.is_null() {
        return Err(FfiError::new(VIX_E_OUT_OF_MEMORY, "out of memory"));
    }
    // SAFETY: `p` has room for the count and `n` blocks starting at offset 8; `out`
    // is a valid out pointer (checked by the callers).
    unsafe {
        (*p).numBlocks = count;
        let first = std::ptr::addr_of_mut!((*p).blocks) as *mut VixDiskLibBlock;
        for (i, b) in blocks.into_iter().enumerate() {
            first.add(i).write(b);
        }
        *out = p;
    }
    ok()
}

/// Frees a list from QueryAllocatedBlocks (NULL is allowed).
///
/// # Safety
/// `blockList` must be NULL or come from QueryAllocatedBlocks.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_FreeBlockList(blockList: *mut VixDiskLibBlockList) -> VixError {
    // SAFETY: malloc'd by QueryAllocatedBlocks, or NULL.
    unsafe { libc::free(blockList as *mut c_void) };
    VIX_OK
}
