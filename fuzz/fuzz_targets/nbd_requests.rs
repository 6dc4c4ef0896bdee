//! One NBD connection negotiated by the harness, then raw requests
//! (vdisk_nbd::fuzzing::requests).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vdisk_nbd::fuzzing::requests(data);
});
