//! Who the client is: the TCP peer, or the right-most untrusted `X-Forwarded-For` hop
//! when the peer is a trusted proxy (docs/routing.md, Client IP).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use http::header::HeaderName;
use ipnet::IpNet;

use crate::forward::request_fields::{RequestFields, visible};

/// Built at compile time: a `from_static` call per request re-validates the name.
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Whether `ip` (IPv4-mapped IPv6 read as IPv4) is in one of the `trusted` networks.
pub fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    let ip = ip.to_canonical();
    trusted.iter().any(|net| net.contains(&ip))
}

/// The client address for a request that arrived from `peer`.
///
/// From an untrusted peer the header is ignored entirely. From a trusted peer the chain is
/// walked right to left, skipping trusted hops; the first untrusted hop is the client. If
/// every hop is trusted, the left-most is. An unparseable hop ends the walk at the last
/// good one: whatever is left of it was written by someone we cannot vouch for.
pub fn client_ip<'a>(peer: IpAddr, headers: impl Into<RequestFields<'a>>, trusted: &[IpNet]) -> IpAddr {
    let peer = peer.to_canonical();
    client_ip_with(peer, is_trusted(peer, trusted), headers, trusted)
}

/// [`client_ip`] for a canonical `peer` whose trust the caller already looked up.
pub fn client_ip_with<'a>(
    peer: IpAddr,
    peer_trusted: bool,
    headers: impl Into<RequestFields<'a>>,
    trusted: &[IpNet],
) -> IpAddr {
    if !peer_trusted {
        return peer;
    }
    walk(peer, headers.into().values(&X_FORWARDED_FOR), trusted)
}

fn walk<'a>(peer: IpAddr, values: impl DoubleEndedIterator<Item = &'a [u8]>, trusted: &[IpNet]) -> IpAddr {
    let mut last = peer;
    for value in values.rev() {
        let Some(text) = visible(value) else { return last };
        for hop in right_to_left(text) {
            let hop = hop.trim();
            if hop.is_empty() {
                continue;
            }
            let Some(ip) = parse_hop(hop) else { return last };
            if !is_trusted(ip, trusted) {
                return ip;
            }
            last = ip;
        }
    }
    last
}

/// `text`'s comma-separated items, right to left. Not `rsplit(',')`: the usual value is one
/// short hop, and the searcher's `memrchr` set-up cost more than scanning its bytes (~170
/// instructions against ~50).
fn right_to_left(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let text = rest?;
        match text.bytes().rposition(|b| b == b',') {
            Some(at) => {
                rest = Some(&text[..at]);
                Some(&text[at + 1..])
            }
            None => {
                rest = None;
                Some(text)
            }
        }
    })
}

/// An address as proxies write it: `1.2.3.4`, `2001:db8::1`, `[2001:db8::1]`, with or
/// without a port.
pub fn parse_hop(hop: &str) -> Option<IpAddr> {
    // The usual hop: a load balancer's client, as dotted IPv4.
    if let Some(v4) = parse_ipv4(hop.as_bytes()) {
        return Some(IpAddr::V4(v4));
    }
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(sa) = hop.parse::<SocketAddr>() {
        return Some(sa.ip().to_canonical());
    }
    hop.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .and_then(|h| h.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
}

/// `a.b.c.d` read as `Ipv4Addr::from_str` reads it (one to three decimal digits an octet,
/// at most 255, no leading zero), in one pass over its bytes: std's parser, built of
/// combinators and tried for IPv4 and then IPv6, took ~190 instructions a hop.
fn parse_ipv4(text: &[u8]) -> Option<Ipv4Addr> {
    if text.len() > 15 {
        return None;
    }
    let mut octets = [0u8; 4];
    let mut at = 0;
    for (n, octet) in octets.iter_mut().enumerate() {
        if n > 0 {
            if text.get(at) != Some(&b'.') {
                return None;
            }
            at += 1;
        }
        let start = at;
        let mut value = 0u16;
        while let Some(digit) = text.get(at).and_then(|b| b.checked_sub(b'0')).filter(|d| *d <= 9) {
            if at - start == 3 {
                return None;
            }
            value = value * 10 + u16::from(digit);
            at += 1;
        }
        let digits = at - start;
        if digits == 0 || (digits > 1 && text[start] == b'0') {
            return None;
        }
        *octet = u8::try_from(value).ok()?;
    }
    (at == text.len()).then_some(Ipv4Addr::from(octets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_read_as_std_reads_it() {
        for text in [
            "1.2.3.4",
            "81.2.69.142",
            "255.255.255.255",
            "0.0.0.0",
            "256.1.1.1",
            "01.2.3.4",
            "1.2.3.04",
            "1.2.3.0",
            "1.2.3",
            "1.2.3.4.",
            ".1.2.3.4",
            "1..2.3",
            "1.2.3.4 ",
            "1.2.3.4:80",
            "0001.2.3.4",
            "1000.2.3.4",
            "1.2.3.4444",
            "",
            "::1",
            "1.2.3.٣",
        ] {
            assert_eq!(parse_ipv4(text.as_bytes()), text.parse::<Ipv4Addr>().ok(), "{text:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn ipv4_agrees_with_std(text in "[0-9.:a]{0,17}") {
            proptest::prop_assert_eq!(parse_ipv4(text.as_bytes()), text.parse::<Ipv4Addr>().ok());
        }

        #[test]
        fn ipv4_agrees_with_std_on_addresses(a: u8, b: u8, c: u8, d: u8, zero in 0usize..5) {
            let mut octets = [a, b, c, d].map(|o| o.to_string());
            if let Some(octet) = octets.get_mut(zero) {
                // A leading zero on one octet: std refuses it.
                octet.insert(0, '0');
            }
            let text = octets.join(".");
            proptest::prop_assert_eq!(parse_ipv4(text.as_bytes()), text.parse::<Ipv4Addr>().ok());
        }
    }

    #[test]
    fn items_right_to_left_as_rsplit_gives_them() {
        for text in [
            "",
            "a",
            ",",
            "a,",
            ",a",
            "a,b",
            "1.2.3.4, 5.6.7.8,,9.9.9.9",
            "é,ü",
            ",,",
        ] {
            let want: Vec<&str> = text.rsplit(',').collect();
            assert_eq!(right_to_left(text).collect::<Vec<_>>(), want, "{text:?}");
        }
    }
    use crate::test_fixtures::TestResult;
    use http::HeaderMap;
    use http::header::HeaderValue;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn client_ip_table() -> TestResult {
        let trusted = nets(&["127.0.0.1/32", "10.0.0.0/8", "::1/128"]);
        let cases: [(&str, &[&str], &str); 14] = [
            // Untrusted peer: header ignored.
            ("127.0.0.2", &["81.2.69.142"], "127.0.0.2"),
            ("203.0.113.7", &["81.2.69.142"], "203.0.113.7"),
            // Trusted peer without a header: the peer.
            ("127.0.0.1", &[], "127.0.0.1"),
            ("127.0.0.1", &["81.2.69.142"], "81.2.69.142"),
            // Right-most untrusted wins; spoofed left entries lose.
            ("127.0.0.1", &["1.1.1.1, 81.2.69.142"], "81.2.69.142"),
            ("127.0.0.1", &["1.1.1.1, 81.2.69.142, 10.0.0.5"], "81.2.69.142"),
            // Several header lines are one list, in order.
            ("127.0.0.1", &["1.1.1.1", "81.2.69.142, 10.1.1.1"], "81.2.69.142"),
            // All trusted: the left-most.
            ("127.0.0.1", &["10.0.0.9, 10.0.0.5"], "10.0.0.9"),
            // Ports and brackets as some proxies write them.
            ("127.0.0.1", &["81.2.69.142:5555"], "81.2.69.142"),
            ("127.0.0.1", &["[2001:4860::1]:443"], "2001:4860::1"),
            ("::1", &["2a00:1450::1"], "2a00:1450::1"),
            // Garbage stops the walk at the last good hop.
            ("127.0.0.1", &["81.2.69.142, not-an-ip"], "127.0.0.1"),
            ("127.0.0.1", &["not-an-ip, 10.0.0.3"], "10.0.0.3"),
            // IPv4-mapped peers are judged as IPv4.
            ("::ffff:127.0.0.1", &["81.2.69.142"], "81.2.69.142"),
        ];
        for (peer, xff, want) in cases {
            let mut headers = HeaderMap::new();
            for v in xff {
                headers.append("x-forwarded-for", HeaderValue::from_str(v)?);
            }
            let got = client_ip(peer.parse()?, &headers, &trusted);
            assert_eq!(got, want.parse::<IpAddr>()?, "peer {peer} xff {xff:?}");
        }
        Ok(())
    }
}
