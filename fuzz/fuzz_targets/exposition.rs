//! Fuzz the metrics-page reader: never panic; a sample it reads renders to a line it reads
//! back the same; the load reader never panics on any page.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meridian::health::exposition::{Line, parse_line};

fuzz_target!(|data: &[u8]| {
    let Ok(page) = std::str::from_utf8(data) else { return };
    for line in page.lines() {
        if let Ok(Line::Sample(s)) = parse_line(line) {
            let rendered = s.render();
            match parse_line(&rendered) {
                // NaN is not equal to itself: compare the rendered lines.
                Ok(Line::Sample(again)) => assert_eq!(again.render(), rendered),
                other => panic!("{rendered:?} did not read back: {other:?}"),
            }
        }
    }
    for source in [
        meridian::config::LoadSource::Vllm,
        meridian::config::LoadSource::Tgi,
        meridian::config::LoadSource::Sglang,
    ] {
        let _ = meridian::health::load::parse_prometheus(source, page);
    }
});
