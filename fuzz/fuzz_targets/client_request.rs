//! Fuzz the reading of a client's HTTP/1.1 request (head, framing rules, chunked body) as
//! Meridian's server reads it: any bytes must read as a request or fail with a reason,
//! never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = meridian::listen::h1::head::read_whole_request(data, 64 * 1024, 100);
    // A small limit reaches the too-large paths with short inputs.
    let _ = meridian::listen::h1::head::read_whole_request(data, 64, 4);
});
