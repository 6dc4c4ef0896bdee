//! libvixDiskLib over the `nbd` transport: a connection with `serverName` set reaches
//! an NBD server (an in-process `vdisk_nbd::Server` on a Unix socket), Open takes
//! the export name as the path, and Read, ReadAsync, Write, Flush, GetInfo,
//! QueryAllocatedBlocks and the change-tracking extensions answer as they do for
//! the same disk opened locally. What needs the disk's files is refused with
//! `VIX_E_NOT_SUPPORTED`; a server that is not there fails ConnectEx.

use std::ffi::{c_void, CString};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use vdisk::{create, CreateOptions, DiskType, OpenOptions};
use vdisk_nbd::{DiskExport, Exports, Mode, Server};
use vixDiskLib::api_cbt::{
    VdiskExt_EnableChangeTracking, VdiskExt_GetChangeId, VdiskExt_QueryChangedAreas,
};
use vixDiskLib::api_io::{
    VixDiskLib_Close, VixDiskLib_Flush, VixDiskLib_FreeBlockList, VixDiskLib_FreeInfo,
    VixDiskLib_GetInfo, VixDiskLib_GetMetadataKeys, VixDiskLib_Open,
    VixDiskLib_QueryAllocatedBlocks, VixDiskLib_Read, VixDiskLib_ReadAsync, VixDiskLib_Wait,
    VixDiskLib_Write,
};
use vixDiskLib::api_lib::{
    VixDiskLib_ConnectEx, VixDiskLib_Disconnect, VixDiskLib_GetTransportMode,
    VixDiskLib_ListTransportModes,
};
use vixDiskLib::api_ops::{
    VixDiskLib_CheckRepair, VixDiskLib_Clone, VixDiskLib_Create, VixDiskLib_Defragment,
    VixDiskLib_Unlink,
};
use vixDiskLib::errors::{VIX_ASYNC, VIX_E_NOT_SUPPORTED, VIX_OK};
use vixDiskLib::types::{
    VixDiskLibBlock, VixDiskLibBlockList, VixDiskLibConnectParams, VixDiskLibConnection,
    VixDiskLibCreateParams, VixDiskLibHandle, VixDiskLibInfo, VixError,
    VIXDISKLIB_ADAPTER_SCSI_LSILOGIC, VIXDISKLIB_DISK_MONOLITHIC_SPARSE,
    VIXDISKLIB_FLAG_OPEN_READ_ONLY,
};

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;
const SECTOR: u64 = 512;

/// Only one test at a time uses the library's global state.
static SERIAL: Mutex<()> = Mutex::new(());

fn check(code: VixError, what: &str) {
    assert_eq!(code, VIX_OK, "{what} failed with {code} ({code:#x})");
}

fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i) / 512 * 13 + (offset + i) % 241) as u8 | 1)
        .collect()
}

/// A tracked sparse disk with data in a few places; returns the change ID taken
/// between the first and the second round of writes.
fn make_disk(p: &Path) -> String {
    create(p, &CreateOptions::new(DiskType::MonolithicSparse, DISK)).unwrap();
    vdisk::cbt::enable(p).unwrap();
    let d = OpenOptions::new().write(true).open(p).unwrap();
    d.write_at(&pattern(0, 3 * MIB as usize), 0).unwrap();
    d.write_at(&pattern(20 * MIB, MIB as usize), 20 * MIB)
        .unwrap();
    let id = d.change_id().unwrap();
    d.write_at(&pattern(40 * MIB, 2 * MIB as usize), 40 * MIB)
        .unwrap();
    d.close().unwrap();
    id
}

struct Running {
    server: Server,
    sock: PathBuf,
    dir: tempfile::TempDir,
    id: String,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    fn start(mode: Mode) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vm.vmdk");
        let id = make_disk(&p);
        let server = Server::new(Exports::new(
            vec![DiskExport {
                name: "[datastore1] vm/vm.vmdk".into(),
                path: p,
            }],
            Vec::new(),
            mode,
        ));
        let sock = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let s = server.clone();
        let thread = std::thread::spawn(move || s.serve_unix(&listener));
        Running {
            server,
            sock,
            dir,
            id,
            thread: Some(thread),
        }
    }

    fn disk_path(&self) -> PathBuf {
        self.dir.path().join("vm.vmdk")
    }
}

impl Running {
    /// Stops the server and waits until it has closed every disk.
    fn stop(&mut self) {
        self.server.stop();
        // Wakes the listener's accept.
        let _ = std::os::unix::net::UnixStream::connect(&self.sock);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

fn connect(server: &str, modes: Option<&str>) -> Result<VixDiskLibConnection, VixError> {
    let server = CString::new(server).unwrap();
    let vmx = CString::new("moref=vm-42").unwrap();
    // SAFETY: all-zero is a valid (empty) parameter struct.
    let mut params: VixDiskLibConnectParams = unsafe { std::mem::zeroed() };
    params.serverName = server.as_ptr() as *mut _;
    params.vmxSpec = vmx.as_ptr() as *mut _;
    let modes = modes.map(|m| CString::new(m).unwrap());
    let mut conn: VixDiskLibConnection = ptr::null_mut();
    // SAFETY: a valid parameter struct whose strings outlive the call, a valid out
    // pointer.
    let code = unsafe {
        VixDiskLib_ConnectEx(
            &params,
            0,
            ptr::null(),
            modes.as_ref().map_or(ptr::null(), |m| m.as_ptr()),
            &mut conn,
        )
    };
    if code == VIX_OK {
        Ok(conn)
    } else {
        Err(code)
    }
}

fn open(conn: VixDiskLibConnection, path: &str, flags: u32) -> VixDiskLibHandle {
    let p = CString::new(path).unwrap();
    let mut h: VixDiskLibHandle = ptr::null_mut();
    // SAFETY: a NUL-terminated path and a valid out pointer.
    check(
        unsafe { VixDiskLib_Open(conn, p.as_ptr(), flags, &mut h) },
        "Open",
    );
    h
}

fn read(h: VixDiskLibHandle, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    // SAFETY: `buf` holds the sectors asked for.
    check(
        unsafe { VixDiskLib_Read(h, offset / SECTOR, len as u64 / SECTOR, buf.as_mut_ptr()) },
        "Read",
    );
    buf
}

fn blocks(list: *mut VixDiskLibBlockList) -> Vec<(u64, u64)> {
    // SAFETY: a list from the library: `numBlocks` entries from `blocks` on.
    let out = unsafe {
        let n = (*list).numBlocks as usize;
        let first = ptr::addr_of!((*list).blocks).cast::<VixDiskLibBlock>();
        (0..n)
            .map(|i| {
                let b = &*first.add(i);
                (b.offset, b.length)
            })
            .collect()
    };
    // SAFETY: the list came from the library.
    check(unsafe { VixDiskLib_FreeBlockList(list) }, "FreeBlockList");
    out
}

fn allocated(h: VixDiskLibHandle) -> Vec<(u64, u64)> {
    let mut list: *mut VixDiskLibBlockList = ptr::null_mut();
    // SAFETY: an open handle and a valid out pointer.
    check(
        unsafe { VixDiskLib_QueryAllocatedBlocks(h, 0, DISK / SECTOR, 128, &mut list) },
        "QueryAllocatedBlocks",
    );
    blocks(list)
}

fn changed(h: VixDiskLibHandle, id: &str) -> Result<Vec<(u64, u64)>, VixError> {
    let id = CString::new(id).unwrap();
    let mut list: *mut VixDiskLibBlockList = ptr::null_mut();
    // SAFETY: an open handle, a NUL-terminated ID and a valid out pointer.
    let code = unsafe { VdiskExt_QueryChangedAreas(h, id.as_ptr(), 0, DISK / SECTOR, &mut list) };
    if code != VIX_OK {
        return Err(code);
    }
    Ok(blocks(list))
}

fn mode_of(h: VixDiskLibHandle) -> String {
    let p = VixDiskLib_GetTransportMode(h);
    assert!(!p.is_null());
    // SAFETY: a static NUL-terminated string from the library.
    unsafe { std::ffi::CStr::from_ptr(p) }
        .to_string_lossy()
        .into_owned()
}

struct Done {
    calls: AtomicU64,
    failures: AtomicU64,
}

extern "C" fn on_done(data: *mut c_void, result: VixError) {
    // SAFETY: `data` is the `Done` passed with the request, alive until Wait.
    let done = unsafe { &*(data as *const Done) };
    done.calls.fetch_add(1, Ordering::SeqCst);
    if result != VIX_OK {
        done.failures.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn a_remote_disk_reads_maps_and_tracks_like_the_local_one() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let run = Running::start(Mode::NonPersistent);
    let local = OpenOptions::new().open(run.disk_path()).unwrap();
    let modes = VixDiskLib_ListTransportModes();
    // SAFETY: a static NUL-terminated string.
    let modes = unsafe { std::ffi::CStr::from_ptr(modes) }.to_string_lossy();
    assert_eq!(modes, "file:nbd:nbdssl");

    let server = format!("unix:{}", run.sock.display());
    let conn = connect(&server, Some("nbd")).expect("ConnectEx over nbd");
    let h = open(
        conn,
        "[datastore1] vm/vm.vmdk",
        VIXDISKLIB_FLAG_OPEN_READ_ONLY,
    );
    assert_eq!(mode_of(h), "nbd");

    let mut info: *mut VixDiskLibInfo = ptr::null_mut();
    // SAFETY: an open handle and a valid out pointer.
    check(unsafe { VixDiskLib_GetInfo(h, &mut info) }, "GetInfo");
    // SAFETY: GetInfo succeeded: `info` is valid until FreeInfo.
    unsafe {
        assert_eq!((*info).capacity, DISK / SECTOR);
        assert_eq!((*info).numLinks, 1);
        VixDiskLib_FreeInfo(info);
    }

    // Synchronous reads: the whole disk, in 4 MiB pieces.
    let mut expected = vec![0u8; 4 * MIB as usize];
    for at in (0..DISK).step_by(4 * MIB as usize) {
        local.read_at(&mut expected, at).unwrap();
        assert!(read(h, at, expected.len()) == expected, "bytes at {at}");
    }
    // Pipelined asynchronous reads of 1 MiB: each callback once, every byte right.
    let done = Done {
        calls: AtomicU64::new(0),
        failures: AtomicU64::new(0),
    };
    let mut bufs = vec![vec![0u8; MIB as usize]; 16];
    for (i, b) in bufs.iter_mut().enumerate() {
        // SAFETY: each buffer and `done` outlive the Wait below.
        let code = unsafe {
            VixDiskLib_ReadAsync(
                h,
                i as u64 * MIB / SECTOR,
                MIB / SECTOR,
                b.as_mut_ptr(),
                Some(on_done),
                &done as *const Done as *mut c_void,
            )
        };
        assert_eq!(code, VIX_ASYNC, "ReadAsync {i}");
    }
    check(VixDiskLib_Wait(h), "Wait");
    assert_eq!(done.calls.load(Ordering::SeqCst), 16);
    assert_eq!(done.failures.load(Ordering::SeqCst), 0);
    for (i, b) in bufs.iter().enumerate() {
        let mut want = vec![0u8; MIB as usize];
        local.read_at(&mut want, i as u64 * MIB).unwrap();
        assert!(*b == want, "async read {i}");
    }

    // Allocated blocks as the local disk has them.
    let local_conn = connect_local();
    let lh = open(
        local_conn,
        run.disk_path().to_str().unwrap(),
        VIXDISKLIB_FLAG_OPEN_READ_ONLY,
    );
    assert_eq!(allocated(h), allocated(lh));
    // Change tracking: the current ID, and the areas since the earlier one.
    let mut id: *mut std::ffi::c_char = ptr::null_mut();
    // SAFETY: an open handle and a valid out pointer.
    check(unsafe { VdiskExt_GetChangeId(h, &mut id) }, "GetChangeId");
    // SAFETY: a malloc'd NUL-terminated string.
    let current = unsafe { std::ffi::CStr::from_ptr(id) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: from malloc.
    unsafe { libc_free(id.cast()) };
    assert_eq!(current, local.change_id().unwrap());
    assert_eq!(changed(h, &run.id).unwrap(), changed(lh, &run.id).unwrap());
    assert_eq!(
        changed(h, &run.id).unwrap(),
        vec![(40 * MIB / SECTOR, 2 * MIB / SECTOR)]
    );
    assert!(changed(h, "52 00 00 00 00 00 00 00-00 00 00 00 00 00 00 00/1").is_err());

    // What needs the files is refused, clearly.
    let mut needed = 0usize;
    // SAFETY: an open handle; a NULL buffer asks for the size.
    let code = unsafe { VixDiskLib_GetMetadataKeys(h, ptr::null_mut(), 0, &mut needed) };
    assert_eq!(code, VIX_E_NOT_SUPPORTED);

    check(VixDiskLib_Close(lh), "Close local");
    check(VixDiskLib_Disconnect(local_conn), "Disconnect local");
    check(VixDiskLib_Close(h), "Close");
    check(VixDiskLib_Disconnect(conn), "Disconnect");
}

#[test]
fn writes_through_a_persistent_export_reach_the_disk() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut run = Running::start(Mode::Persistent);
    let conn = connect(&format!("unix:{}", run.sock.display()), None).expect("ConnectEx");
    let h = open(conn, "[datastore1] vm/vm.vmdk", 0);
    let data = pattern(7, 3 * MIB as usize);
    // SAFETY: `data` holds the sectors written.
    check(
        unsafe { VixDiskLib_Write(h, 10 * MIB / SECTOR, 3 * MIB / SECTOR, data.as_ptr()) },
        "Write",
    );
    check(VixDiskLib_Flush(h), "Flush");
    assert!(read(h, 10 * MIB, data.len()) == data);
    check(VixDiskLib_Close(h), "Close");
    check(VixDiskLib_Disconnect(conn), "Disconnect");
    run.stop();
    let local = OpenOptions::new().open(run.disk_path()).unwrap();
    let mut back = vec![0u8; data.len()];
    local.read_at(&mut back, 10 * MIB).unwrap();
    assert!(back == data, "the write reached the served disk");
}

#[test]
fn file_operations_need_a_local_connection_and_clone_copies_a_remote_disk() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut run = Running::start(Mode::ReadOnly);
    let conn = connect(&format!("unix:{}", run.sock.display()), Some("nbd")).expect("ConnectEx");
    let local = connect_local_rw();
    let out = tempfile::tempdir().unwrap();
    let made = out.path().join("made.vmdk");
    let made_c = CString::new(made.to_str().unwrap()).unwrap();
    // SAFETY: all-zero create parameters, then the fields a new disk needs.
    let mut cp: VixDiskLibCreateParams = unsafe { std::mem::zeroed() };
    cp.diskType = VIXDISKLIB_DISK_MONOLITHIC_SPARSE;
    cp.adapterType = VIXDISKLIB_ADAPTER_SCSI_LSILOGIC;
    cp.capacity = DISK / SECTOR;
    // Over the remote connection, nothing is made or touched on this host: the
    // path is not a local file's.
    // SAFETY: a live connection, NUL-terminated paths, valid parameters, no callback.
    let codes = unsafe {
        [
            VixDiskLib_Create(conn, made_c.as_ptr(), &cp, None, ptr::null_mut()),
            VixDiskLib_CheckRepair(conn, made_c.as_ptr(), 0),
            VixDiskLib_Unlink(conn, made_c.as_ptr()),
            VdiskExt_EnableChangeTracking(conn, made_c.as_ptr(), 1),
        ]
    };
    assert_eq!(codes, [VIX_E_NOT_SUPPORTED; 4]);
    assert!(
        !made.exists(),
        "Create over a remote connection made a local file"
    );
    let h = open(
        conn,
        "[datastore1] vm/vm.vmdk",
        VIXDISKLIB_FLAG_OPEN_READ_ONLY,
    );
    // SAFETY: an open handle, no callback.
    let code = unsafe { VixDiskLib_Defragment(h, None, ptr::null_mut()) };
    assert_eq!(code, VIX_E_NOT_SUPPORTED);
    check(VixDiskLib_Close(h), "Close");

    // Clone: from the server into a new local disk; not the other way.
    let export = CString::new("[datastore1] vm/vm.vmdk").unwrap();
    // SAFETY: live connections, NUL-terminated paths, valid parameters.
    check(
        unsafe {
            VixDiskLib_Clone(
                local,
                made_c.as_ptr(),
                conn,
                export.as_ptr(),
                &cp,
                None,
                ptr::null_mut(),
                0,
            )
        },
        "Clone from the remote connection",
    );
    // SAFETY: as above.
    let code = unsafe {
        VixDiskLib_Clone(
            conn,
            export.as_ptr(),
            local,
            made_c.as_ptr(),
            &cp,
            None,
            ptr::null_mut(),
            1,
        )
    };
    assert_eq!(code, VIX_E_NOT_SUPPORTED);
    check(VixDiskLib_Disconnect(conn), "Disconnect");
    check(VixDiskLib_Disconnect(local), "Disconnect local");
    run.stop();
    let a = OpenOptions::new().open(run.disk_path()).unwrap();
    let b = OpenOptions::new().open(&made).unwrap();
    assert_eq!(a.capacity(), b.capacity());
    let (mut x, mut y) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    for off in (0..DISK).step_by(MIB as usize) {
        a.read_at(&mut x, off).unwrap();
        b.read_at(&mut y, off).unwrap();
        assert!(x == y, "the clone differs at {off}");
    }
}

#[test]
fn a_server_that_is_not_there_or_not_nbd_fails_connectex() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("unix:{}", dir.path().join("none.sock").display());
    let code = connect(&missing, Some("nbd")).unwrap_err();
    assert_ne!(code, VIX_OK);
    // A listener that answers like a web server.
    let sock = dir.path().join("http.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        use std::io::Write;
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    let code = connect(&format!("unix:{}", sock.display()), Some("nbd")).unwrap_err();
    assert_eq!(code, vdisk::ErrorKind::Handshake.vix_code());
    t.join().unwrap();
    // Asking only for transports this library does not have.
    let code = connect("localhost", Some("san:hotadd")).unwrap_err();
    assert_eq!(code, VIX_E_NOT_SUPPORTED);
}

fn connect_local_rw() -> VixDiskLibConnection {
    let mut conn: VixDiskLibConnection = ptr::null_mut();
    // SAFETY: NULL parameters mean local files; a valid out pointer.
    check(
        unsafe { VixDiskLib_ConnectEx(ptr::null(), 0, ptr::null(), ptr::null(), &mut conn) },
        "ConnectEx local",
    );
    conn
}

fn connect_local() -> VixDiskLibConnection {
    let mut conn: VixDiskLibConnection = ptr::null_mut();
    // SAFETY: NULL parameters mean local files; a valid out pointer.
    check(
        unsafe { VixDiskLib_ConnectEx(ptr::null(), 1, ptr::null(), ptr::null(), &mut conn) },
        "ConnectEx local",
    );
    conn
}

extern "C" {
    #[link_name = "free"]
    fn libc_free(p: *mut c_void);
}
