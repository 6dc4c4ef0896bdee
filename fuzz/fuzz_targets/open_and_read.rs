//! A whole disk (a bundle of files) opened and read (vdisk::fuzzing::open_and_read).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vdisk::fuzzing::open_and_read(data);
});
