//! Fuzz the PROXY protocol v1/v2 header parser: any bytes parse, ask for more, or fail
//! cleanly; a parsed header never claims more bytes than it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(header)) = meridian::listen::proxy_protocol::parse(data) {
        assert!(header.len <= data.len());
    }
});
