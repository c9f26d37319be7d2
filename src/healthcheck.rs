//! `meridian healthcheck`: asks this instance's admin `/readyz`, for container
//! `HEALTHCHECK`s and images without curl.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use crate::config::file::FileConfig;

/// Why the instance is not ready, or could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum HealthcheckError {
    /// The config file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The config file as given.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config is not TOML, or its `admin.listen` is not an address.
    #[error("{path}: {message}")]
    Config {
        /// The config file as given.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// Connecting to the admin listener, or writing to or reading from it, failed.
    #[error("cannot reach the admin listener at {addr}: {source}")]
    Connect {
        /// The admin address asked (a wildcard listen address is reached on loopback).
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// No HTTP/1.x status line came back (an empty or garbled answer).
    #[error("no HTTP answer from {addr}/readyz")]
    Garbled {
        /// The admin address asked.
        addr: SocketAddr,
    },
    /// `/readyz` answered, but not 200: the first probe round is not done, or shutdown began.
    #[error("not ready: {addr}/readyz answered {status}")]
    NotReady {
        /// The admin address asked.
        addr: SocketAddr,
        /// The status `/readyz` answered.
        status: u16,
    },
}

/// Where `meridian run -c path` serves admin, read without validating the rest of the
/// config: a health check must not fail because, say, a fallback key is not in its env.
pub fn admin_addr(path: &Path) -> Result<SocketAddr, HealthcheckError> {
    let text = std::fs::read_to_string(path).map_err(|source| HealthcheckError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let config_error = |message: String| HealthcheckError::Config {
        path: path.display().to_string(),
        message,
    };
    let raw: FileConfig = toml::from_str(&text).map_err(|e| config_error(e.message().trim().to_string()))?;
    let listen = raw
        .admin
        .listen
        .map_or_else(|| "127.0.0.1:9901".to_string(), |l| l.into_inner());
    let addr: SocketAddr = listen.parse().map_err(|_| {
        config_error(format!(
            "admin.listen: {listen:?} is not an address like \"127.0.0.1:9901\""
        ))
    })?;
    Ok(connect_addr(addr))
}

/// A wildcard listen address is reached on loopback.
pub(crate) fn connect_addr(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), listen.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), listen.port()),
        _ => listen,
    }
}

/// The status code of an HTTP/1.x response head.
pub fn status_code(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/1."))?;
    parts.next()?.parse().ok().filter(|s| (100..600).contains(s))
}

/// GETs `/readyz` within `timeout`; Ok when it answers 200.
pub fn check(addr: SocketAddr, timeout: Duration) -> Result<(), HealthcheckError> {
    let connect = |source| HealthcheckError::Connect { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(connect)?;
    stream.set_read_timeout(Some(timeout)).map_err(connect)?;
    stream.set_write_timeout(Some(timeout)).map_err(connect)?;
    let request = format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(connect)?;
    // The status line is all that is needed; it comes first.
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 4096 {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(source) => return Err(connect(source)),
        }
    }
    match status_code(&head) {
        Some(200) => Ok(()),
        Some(status) => Err(HealthcheckError::NotReady { addr, status }),
        None => Err(HealthcheckError::Garbled { addr }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_addresses_are_reached_on_loopback() {
        let cases = [
            ("0.0.0.0:9901", "127.0.0.1:9901"),
            ("[::]:9901", "[::1]:9901"),
            ("127.0.0.1:9901", "127.0.0.1:9901"),
            ("10.0.0.5:9000", "10.0.0.5:9000"),
        ];
        for (listen, want) in cases {
            let listen: SocketAddr = listen.parse().unwrap();
            assert_eq!(connect_addr(listen).to_string(), want);
        }
    }

    #[test]
    fn status_line_table() {
        let cases: [(&[u8], Option<u16>); 7] = [
            (b"HTTP/1.1 200 OK\r\n", Some(200)),
            (b"HTTP/1.0 503 Service Unavailable\r\ncontent-length: 0\r\n", Some(503)),
            (b"HTTP/1.1 200", Some(200)),
            (b"HTTP/2 200\r\n", None),
            (b"SSH-2.0-OpenSSH\r\n", None),
            (b"HTTP/1.1 abc\r\n", None),
            (b"", None),
        ];
        for (head, want) in cases {
            assert_eq!(status_code(head), want, "{:?}", String::from_utf8_lossy(head));
        }
    }
}
