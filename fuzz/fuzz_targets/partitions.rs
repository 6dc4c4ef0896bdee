//! Partition tables and file-system detection over a sparse image (vdisk_mount::fuzzing::partitions).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vdisk_mount::fuzzing::partitions(data);
});
