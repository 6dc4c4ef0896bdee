//! One NBD connection from its raw client bytes on: negotiation, then whatever
//! transmission it reaches (vdisk_nbd::fuzzing::handshake).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vdisk_nbd::fuzzing::handshake(data);
});
