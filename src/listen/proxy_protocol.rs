//! PROXY protocol v1/v2 on accepted connections: a pure header parser and the read that
//! runs it under a deadline, replaying whatever followed the header to the next layer.

use std::io::{self, Cursor};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use ppp::{HeaderResult, PartialResult, v1, v2};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, Chain, Join, ReadHalf, WriteHalf};

/// Longest header accepted. A v2 header may announce up to 64 KiB of TLVs, but load
/// balancers send a few dozen bytes; a bound keeps a hostile peer from making us buffer.
pub(crate) const MAX_HEADER: usize = 4096;

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The header starts like v1 (`PROXY `) but does not parse.
    #[error("malformed PROXY v1 header: {0}")]
    V1(#[source] v1::BinaryParseError),
    /// The header starts with the v2 signature but does not parse.
    #[error("malformed PROXY v2 header: {0}")]
    V2(#[source] v2::ParseError),
    /// The header would exceed 4 KiB.
    #[error("PROXY header longer than {MAX_HEADER} bytes")]
    TooLong,
    /// No complete header within `server.header_read_timeout`.
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    /// The peer closed the connection before its header was complete.
    #[error("connection closed before a complete PROXY header")]
    Closed,
    /// Reading from the connection failed.
    #[error("reading the PROXY header: {0}")]
    Io(#[source] io::Error),
}

/// A complete header: how many bytes it took, and the client it names (`None` when the
/// header says to use the connection's own peer: v2 LOCAL, v1 UNKNOWN, unix or
/// unspecified families).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Bytes the header takes at the start of the connection.
    pub len: usize,
    /// The client address it names; `None` for `UNKNOWN` and `LOCAL` headers.
    pub source: Option<SocketAddr>,
}

/// The longest v1 header, CRLF included (PROXY protocol spec, section 2.1).
const V1_MAX: usize = 107;

/// Parses the start of a connection: `Ok(None)` when more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<Header>, ProxyHeaderError> {
    // A v1 header is one text line, judged only once the line is whole: ppp takes a line
    // cut inside a field (`... 5555 ` before the destination port) for a malformed one.
    let v1_line = buf.starts_with(b"PROXY");
    let input = if v1_line {
        match buf.iter().take(V1_MAX).position(|&b| b == b'\n') {
            Some(end) => &buf[..=end],
            None if buf.len() >= V1_MAX => {
                return Err(ProxyHeaderError::V1(v1::ParseError::HeaderTooLong.into()));
            }
            None => return Ok(None),
        }
    } else {
        buf
    };
    let result = HeaderResult::parse(input);
    if result.is_incomplete() {
        return match result {
            // A whole line that still lacks a part is malformed, not short.
            HeaderResult::V1(Err(e)) if v1_line => Err(ProxyHeaderError::V1(e)),
            _ if buf.len() >= MAX_HEADER => Err(ProxyHeaderError::TooLong),
            _ => Ok(None),
        };
    }
    match result {
        HeaderResult::V1(Ok(h)) => {
            let source = match h.addresses {
                v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Unknown => None,
            };
            Ok(Some(Header {
                len: h.header.len(),
                source,
            }))
        }
        HeaderResult::V2(Ok(h)) => {
            let source = match (h.command, h.addresses) {
                // LOCAL: the balancer's own connection (health checks); the TCP peer stands.
                (v2::Command::Local, _) => None,
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (v2::Command::Proxy, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => None,
            };
            Ok(Some(Header { len: h.len(), source }))
        }
        HeaderResult::V1(Err(e)) => Err(ProxyHeaderError::V1(e)),
        HeaderResult::V2(Err(e)) => Err(ProxyHeaderError::V2(e)),
    }
}

/// Reads the PROXY header at the start of `stream` within `timeout`. Returns the client
/// address it names (if any) and the stream with the bytes read past the header put back.
pub(crate) async fn read_header<S>(
    mut stream: S,
    timeout: Duration,
) -> Result<(Option<SocketAddr>, Prefixed<S>), ProxyHeaderError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let read = async {
        let mut buf = BytesMut::with_capacity(256);
        loop {
            if stream.read_buf(&mut buf).await.map_err(ProxyHeaderError::Io)? == 0 {
                return Err(ProxyHeaderError::Closed);
            }
            if let Some(header) = parse(&buf)? {
                let mut rest = buf.freeze();
                rest.advance(header.len);
                return Ok((header.source, rest));
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok((source, rest))) => {
            let (read, write) = tokio::io::split(stream);
            Ok((
                source,
                tokio::io::join(AsyncReadExt::chain(Cursor::new(rest), read), write),
            ))
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ProxyHeaderError::Timeout(timeout)),
    }
}

/// A stream with the bytes read past its PROXY header put back in front (tokio's `join`
/// of a chained reader and the write half).
pub(crate) type Prefixed<S> = Join<Chain<Cursor<Bytes>, ReadHalf<S>>, WriteHalf<S>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::TestResult;

    fn v2(command: u8, family: u8, addresses: &[u8], tail: &[u8]) -> Vec<u8> {
        let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        out.push(0x20 | command);
        out.push(family);
        out.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
        out.extend_from_slice(addresses);
        out.extend_from_slice(tail);
        out
    }

    fn v2_ipv4_proxy() -> Vec<u8> {
        // 81.2.69.142:5555 -> 10.0.0.1:443
        v2(
            0x1,
            0x11,
            &[81, 2, 69, 142, 10, 0, 0, 1, 0x15, 0xb3, 0x01, 0xbb],
            b"GET",
        )
    }

    #[test]
    fn headers_parse_to_their_source() -> TestResult {
        let gb: SocketAddr = "81.2.69.142:5555".parse()?;
        let v6: SocketAddr = "[2001:db8::1]:4000".parse()?;
        let v2_proxy = v2_ipv4_proxy();
        let v2_local = v2(0x0, 0x00, &[], b"");
        let v2_unix = v2(0x1, 0x31, &[0u8; 216], b"");
        let v1_tcp4 = b"PROXY TCP4 81.2.69.142 127.0.0.1 5555 8080\r\nGET / HTTP/1.1\r\n".to_vec();
        let v1_tcp6 = b"PROXY TCP6 2001:db8::1 ::1 4000 443\r\n".to_vec();
        let v1_unknown = b"PROXY UNKNOWN\r\n".to_vec();
        let cases: [(&[u8], Option<Header>); 6] = [
            (
                &v1_tcp4,
                Some(Header {
                    len: 44,
                    source: Some(gb),
                }),
            ),
            (
                &v1_tcp6,
                Some(Header {
                    len: 37,
                    source: Some(v6),
                }),
            ),
            (&v1_unknown, Some(Header { len: 15, source: None })),
            (
                &v2_proxy,
                Some(Header {
                    len: 28,
                    source: Some(gb),
                }),
            ),
            (&v2_local, Some(Header { len: 16, source: None })),
            (&v2_unix, Some(Header { len: 232, source: None })),
        ];
        for (input, want) in cases {
            assert_eq!(parse(input)?, want, "{:?}", String::from_utf8_lossy(input));
        }
        Ok(())
    }

    #[test]
    fn partial_headers_ask_for_more() -> TestResult {
        let v2_proxy = v2_ipv4_proxy();
        let cases: [&[u8]; 6] = [
            b"",
            b"PRO",
            b"PROXY TCP4 81.2.69.142",
            b"PROXY TCP4 81.2.69.142 127.0.0.1 5555 8080\r",
            &v2_proxy[..10],
            &v2_proxy[..20],
        ];
        for input in cases {
            assert_eq!(parse(input)?, None, "{:?}", String::from_utf8_lossy(input));
        }
        Ok(())
    }

    #[test]
    fn a_v1_header_cut_anywhere_asks_for_more() -> TestResult {
        let headers: [&[u8]; 4] = [
            b"PROXY TCP4 81.2.69.142 127.0.0.1 5555 23082\r\n",
            b"PROXY TCP6 2001:db8::1 ::1 4000 443\r\n",
            b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
            b"PROXY UNKNOWN\r\n",
        ];
        for header in headers {
            for cut in 0..header.len() {
                let part = &header[..cut];
                assert_eq!(parse(part)?, None, "{:?}", String::from_utf8_lossy(part));
            }
            let whole = parse(header)?.ok_or("whole header")?;
            assert_eq!(whole.len, header.len());
        }
        Ok(())
    }

    #[test]
    fn garbage_is_refused() {
        let bad_v2_command = v2(0x7, 0x11, &[0; 12], b"");
        let too_long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        let cases: [&[u8]; 9] = [
            b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
            // Whole lines that lack a part, or end without CR.
            b"PROXY TCP4 81.2.69.142\r\n",
            b"PROXY TCP4 81.2.69.142 127.0.0.1 5555 \r\n",
            b"PROXY TCP4 81.2.69.142 127.0.0.1 5555 8080\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 999.2.3.4 5.6.7.8 1 2\r\n",
            &bad_v2_command,
            &too_long,
        ];
        for input in cases {
            assert!(parse(input).is_err(), "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[tokio::test]
    async fn bytes_after_the_header_are_replayed() -> TestResult {
        let (mut client, server) = tokio::io::duplex(1024);
        use tokio::io::AsyncWriteExt;
        // Split writes: the header arrives in pieces, the request right behind it.
        client.write_all(b"PROXY TCP4 81.2.69.142 127.0.0.1 55").await?;
        let reader = tokio::spawn(read_header(server, Duration::from_secs(5)));
        client.write_all(b"55 8080\r\nGET / HTTP/1.1\r\n\r\n").await?;
        let (source, mut rest) = reader.await??;
        assert_eq!(source, Some("81.2.69.142:5555".parse()?));
        drop(client);
        let mut after = Vec::new();
        rest.read_to_end(&mut after).await?;
        assert_eq!(after, b"GET / HTTP/1.1\r\n\r\n");
        Ok(())
    }

    #[tokio::test]
    async fn a_silent_peer_times_out() -> TestResult {
        let (_client, server) = tokio::io::duplex(64);
        let err = read_header(server, Duration::from_millis(50))
            .await
            .err()
            .ok_or("a silent peer gave a header")?;
        assert!(matches!(err, ProxyHeaderError::Timeout(_)), "{err}");
        Ok(())
    }
}
