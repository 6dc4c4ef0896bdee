//! The descriptor text parser and writer (vdisk::fuzzing::descriptor).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vdisk::fuzzing::descriptor(data);
});
