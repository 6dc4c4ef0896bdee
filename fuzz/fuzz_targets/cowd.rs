//! A vmfsSparse (COWD) extent held in memory (vdisk::fuzzing::cowd).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vdisk::fuzzing::cowd(data);
});
