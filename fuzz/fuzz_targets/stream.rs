//! A streamOptimized extent held in memory (vdisk::fuzzing::stream).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vdisk::fuzzing::stream(data);
});
