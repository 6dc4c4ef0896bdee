//! Change tracking through the C API: a disk whose tracking was turned on by a
//! relative path (`vdiskmanager cbt enable d.vmdk` in its folder) and written by a
//! VDDK client, which opens disks by their absolute path, keeps the change ID taken
//! before the write; every spelling of the path reads the same changed areas.
//!
//! The test changes the working folder, so it lives alone in this test binary.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::ptr;

use vixDiskLib::api_cbt::{
    VdiskExt_EnableChangeTracking, VdiskExt_GetChangeId, VdiskExt_QueryChangedAreas,
};
use vixDiskLib::api_io::{
    VixDiskLib_Close, VixDiskLib_FreeBlockList, VixDiskLib_Open, VixDiskLib_Write,
};
use vixDiskLib::api_lib::{
    VixDiskLib_Connect, VixDiskLib_Disconnect, VixDiskLib_Exit, VixDiskLib_Init,
};
use vixDiskLib::errors::VIX_OK;
use vixDiskLib::types::{
    VixDiskLibBlockList, VixDiskLibConnection, VixDiskLibHandle, VixError,
    VIXDISKLIB_FLAG_OPEN_READ_ONLY,
};

const SECTOR: u64 = 512;

fn check(code: VixError, what: &str) {
    assert_eq!(code, VIX_OK, "{what} failed with {code:#x}");
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

fn open(conn: VixDiskLibConnection, path: &Path, flags: u32) -> VixDiskLibHandle {
    let mut h: VixDiskLibHandle = ptr::null_mut();
    // SAFETY: a NUL-terminated path and a valid out pointer.
    let code = unsafe { VixDiskLib_Open(conn, c(path).as_ptr(), flags, &mut h) };
    check(code, &format!("Open {}", path.display()));
    h
}

/// The changed areas since `id` through a handle opened by `path`, in sectors.
fn changed(conn: VixDiskLibConnection, path: &Path, id: &CString) -> Vec<(u64, u64)> {
    let h = open(conn, path, VIXDISKLIB_FLAG_OPEN_READ_ONLY);
    let mut list: *mut VixDiskLibBlockList = ptr::null_mut();
    // SAFETY: an open handle, a NUL-terminated ID and a valid out pointer.
    let code = unsafe { VdiskExt_QueryChangedAreas(h, id.as_ptr(), 0, 1 << 20, &mut list) };
    assert_eq!(
        code,
        VIX_OK,
        "QueryChangedAreas through {} refused the change ID taken before ({code:#x})",
        path.display()
    );
    // SAFETY: on success `list` holds `numBlocks` entries from its `blocks` field on.
    let out = unsafe {
        let n = (*list).numBlocks as usize;
        let first = ptr::addr_of!((*list).blocks).cast::<vixDiskLib::types::VixDiskLibBlock>();
        (0..n)
            .map(|i| {
                let b = &*first.add(i);
                (b.offset, b.length)
            })
            .collect()
    };
    // SAFETY: the list came from QueryChangedAreas.
    check(unsafe { VixDiskLib_FreeBlockList(list) }, "FreeBlockList");
    check(VixDiskLib_Close(h), "Close");
    out
}

#[test]
fn a_vddk_client_writing_by_the_absolute_path_keeps_change_ids_of_a_relative_enable() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let dir = root.join("vm");
    std::fs::create_dir_all(dir.join("a")).unwrap();
    std::os::unix::fs::symlink(&dir, root.join("link")).unwrap();
    std::env::set_current_dir(&dir).unwrap();
    vdisk::create(
        Path::new("d.vmdk"),
        &vdisk::CreateOptions::new(vdisk::DiskType::TwoGbMaxExtentSparse, 8 << 20),
    )
    .unwrap();
    // SAFETY: no callbacks, no library folder.
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
    check(code, "Init");
    let mut conn: VixDiskLibConnection = ptr::null_mut();
    // SAFETY: local connection, valid out pointer.
    let code = unsafe { VixDiskLib_Connect(ptr::null(), &mut conn) };
    check(code, "Connect");
    // SAFETY: a NUL-terminated path.
    let code = unsafe { VdiskExt_EnableChangeTracking(conn, c(Path::new("d.vmdk")).as_ptr(), 1) };
    check(code, "EnableChangeTracking d.vmdk");
    let h = open(conn, Path::new("./d.vmdk"), VIXDISKLIB_FLAG_OPEN_READ_ONLY);
    let mut id_ptr = ptr::null_mut();
    // SAFETY: an open handle and a valid out pointer.
    let code = unsafe { VdiskExt_GetChangeId(h, &mut id_ptr) };
    check(code, "GetChangeId");
    // SAFETY: a malloc'd NUL-terminated string from GetChangeId, copied then freed.
    let id = unsafe {
        let id = std::ffi::CStr::from_ptr(id_ptr).to_owned();
        libc::free(id_ptr.cast());
        id
    };
    check(VixDiskLib_Close(h), "Close");
    // The VDDK client: the absolute path, a write of 8 sectors at 1 MiB.
    let h = open(conn, &dir.join("d.vmdk"), 0);
    let buf = vec![0x5au8; 8 * SECTOR as usize];
    // SAFETY: `buf` holds 8 sectors.
    let code = unsafe { VixDiskLib_Write(h, 2048, 8, buf.as_ptr()) };
    check(code, "Write");
    check(VixDiskLib_Close(h), "Close");
    let spellings: Vec<PathBuf> = vec![
        PathBuf::from("d.vmdk"),
        PathBuf::from("./d.vmdk"),
        dir.join("d.vmdk"),
        root.join("link/d.vmdk"),
        PathBuf::from("a/../d.vmdk"),
    ];
    for s in &spellings {
        assert_eq!(changed(conn, s, &id), vec![(2048, 8)], "{}", s.display());
    }
    check(VixDiskLib_Disconnect(conn), "Disconnect");
    VixDiskLib_Exit();
}
