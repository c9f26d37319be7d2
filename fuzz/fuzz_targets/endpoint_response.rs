//! Fuzz the reading of an endpoint's HTTP/1.1 response (head, framing, chunked body): any
//! bytes must read as a response or fail with a framing error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for method in [http::Method::GET, http::Method::HEAD] {
        let _ = meridian::forward::h1::read_whole_response(&method, data);
    }
});
