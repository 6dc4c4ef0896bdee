//! A hosted sparse (KDMV) extent held in memory (vdisk::fuzzing::sparse).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vdisk::fuzzing::sparse(data);
});
