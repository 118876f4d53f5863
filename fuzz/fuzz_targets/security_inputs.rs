//! What an attacker controls before authentication: certificate bytes, API keys, access-rule
//! bodies (admin input), and name patterns against names.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = skald_security::x509::subject(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = skald_security::keys::split(text);
        if let Ok(rules) = serde_json::from_str::<skald_security::Rules>(text) {
            let _ = rules.validate();
        }
        if let Some((pattern, name)) = text.split_once('\n') {
            let _ = skald_security::rules::matches(pattern, name);
            let _ = skald_security::rules::covers_prefix(pattern, name);
            let _ = skald_security::rules::may_match_prefix(pattern, name);
        }
    }
});
