//! `VixDiskLib_GetInfo` answers from the header and descriptor: a disk that opens
//! and reads, but one of whose grain-table entries points past the end of its file,
//! still gives its capacity and geometry.

use std::ffi::CString;
use std::ptr;

use vixDiskLib::api_io::{
    VixDiskLib_Close, VixDiskLib_FreeInfo, VixDiskLib_GetInfo, VixDiskLib_Open,
};
use vixDiskLib::api_lib::{
    VixDiskLib_Connect, VixDiskLib_Disconnect, VixDiskLib_Exit, VixDiskLib_Init,
};
use vixDiskLib::errors::VIX_OK;
use vixDiskLib::types::{
    VixDiskLibConnection, VixDiskLibHandle, VixDiskLibInfo, VIXDISKLIB_FLAG_OPEN_READ_ONLY,
};

#[test]
fn get_info_succeeds_on_a_disk_with_one_bad_grain_table_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = vdisk_interop::sparse_with_a_grain_past_the_end(tmp.path());
    let path = CString::new(disk.to_str().unwrap()).unwrap();
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
    assert_eq!(code, VIX_OK);
    let mut conn: VixDiskLibConnection = ptr::null_mut();
    // SAFETY: a local connection and a valid out pointer.
    let code = unsafe { VixDiskLib_Connect(ptr::null(), &mut conn) };
    assert_eq!(code, VIX_OK);
    let mut h: VixDiskLibHandle = ptr::null_mut();
    // SAFETY: a NUL-terminated path and a valid out pointer.
    let code =
        unsafe { VixDiskLib_Open(conn, path.as_ptr(), VIXDISKLIB_FLAG_OPEN_READ_ONLY, &mut h) };
    assert_eq!(code, VIX_OK);
    let mut info: *mut VixDiskLibInfo = ptr::null_mut();
    // SAFETY: an open handle and a valid out pointer.
    let code = unsafe { VixDiskLib_GetInfo(h, &mut info) };
    assert_eq!(code, VIX_OK, "GetInfo failed with {code:#x}");
    // SAFETY: GetInfo succeeded: `info` points to a filled struct.
    let capacity = unsafe { (*info).capacity };
    assert_eq!(capacity, 16384);
    // SAFETY: `info` came from GetInfo.
    unsafe { VixDiskLib_FreeInfo(info) };
    assert_eq!(VixDiskLib_Close(h), VIX_OK);
    assert_eq!(VixDiskLib_Disconnect(conn), VIX_OK);
    VixDiskLib_Exit();
}
