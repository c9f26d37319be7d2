//! Fuzz X-Forwarded-For handling: never panic, never trust an untrusted peer's header.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = http::HeaderValue::from_bytes(data) else { return };
    let mut headers = http::HeaderMap::new();
    headers.insert("x-forwarded-for", value);
    let trusted: Vec<ipnet::IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
    let untrusted_peer = "203.0.113.9".parse().unwrap();
    assert_eq!(meridian::client_ip::client_ip(untrusted_peer, &headers, &trusted), untrusted_peer);
    let _ = meridian::client_ip::client_ip("127.0.0.1".parse().unwrap(), &headers, &trusted);
});
