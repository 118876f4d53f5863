//! Segment bytes as recovery reads them: frames, checksums, record bodies.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    skald_storage::fuzzing::decode_record(data);
});
