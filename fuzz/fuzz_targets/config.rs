//! Fuzz the config loader: any text must parse or fail with problems, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = meridian::config::Config::parse(text, None) {
            assert!(!e.problems.is_empty());
        }
    }
});
