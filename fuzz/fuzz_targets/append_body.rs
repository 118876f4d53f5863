//! Request bodies of the append and query endpoints, and read query strings.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    skald_server::fuzzing::parse_append_body(data);
    if let Ok(text) = std::str::from_utf8(data) {
        skald_server::fuzzing::parse_query_string(text);
    }
});
