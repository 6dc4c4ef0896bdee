//! Without libvixDiskLib loaded in the process, a connection cannot be checked:
//! `VixMntapi_OpenDisks` and `VixMntapi_OpenDiskSet` say so
//! (`VIX_E_DISK_NOINIT`) instead of trusting the handle. (Its own test binary: the
//! other tests load the library.)

use std::ffi::{c_char, CString};
use std::ptr::{null, null_mut};

use vixMntapi::api_lib::{VixMntapi_Exit, VixMntapi_Init};
use vixMntapi::api_set::{VixMntapi_OpenDiskSet, VixMntapi_OpenDisks};
use vixMntapi::types::{VixDiskLibConnection, VixDiskLibHandle, VixDiskSetHandle};

const VIX_OK: u64 = 0;
const VIX_E_DISK_NOINIT: u64 = 16001;

#[test]
fn handles_of_a_library_that_is_not_loaded_are_refused() {
    // SAFETY: the name is NUL-terminated; RTLD_NOLOAD loads nothing.
    let loaded = unsafe {
        libc::dlopen(
            c"libvixDiskLib.so.8".as_ptr(),
            libc::RTLD_NOW | libc::RTLD_NOLOAD,
        )
    };
    assert!(
        loaded.is_null(),
        "libvixDiskLib.so.8 must not be loaded in this test"
    );
    // SAFETY: NULL callbacks and strings.
    let rc = unsafe { VixMntapi_Init(1, 0, null_mut(), null_mut(), null_mut(), null(), null()) };
    assert_eq!(rc, VIX_OK);
    let name = CString::new("/tmp/any.vmdk").unwrap();
    let mut names: [*const c_char; 1] = [name.as_ptr()];
    let mut set: VixDiskSetHandle = 0x10 as VixDiskSetHandle;
    // SAFETY: valid names and out pointer; the connection is only looked up.
    let rc = unsafe {
        VixMntapi_OpenDisks(
            0x10 as VixDiskLibConnection,
            names.as_mut_ptr(),
            1,
            0,
            &mut set,
        )
    };
    assert_eq!(rc, VIX_E_DISK_NOINIT);
    assert!(set.is_null());
    let mut handles = [0x10 as VixDiskLibHandle];
    // SAFETY: as above.
    let rc = unsafe { VixMntapi_OpenDiskSet(handles.as_mut_ptr(), 1, 0, &mut set) };
    assert_eq!(rc, VIX_E_DISK_NOINIT);
    VixMntapi_Exit();
}
