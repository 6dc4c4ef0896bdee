//! A seSparse extent held in memory (vdisk::fuzzing::sesparse).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vdisk::fuzzing::sesparse(data);
});
