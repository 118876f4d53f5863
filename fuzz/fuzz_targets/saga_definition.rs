//! Saga definitions in YAML or JSON, as `POST /v1/sagas` receives them.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = skald_saga::parse(text);
    }
});
