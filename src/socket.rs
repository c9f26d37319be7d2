//! TCP sockets read and written with the system calls themselves.
//!
//! glibc's `recv`, `send`, `sendmsg` and `accept4` are pthread cancellation points: once a
//! process has had a second thread (Meridian's blocking pool does, at the first file poll),
//! each call switches the thread's cancellation type on before the system call and off
//! after it, two atomic updates a call, four calls a proxied request. Meridian never
//! cancels a thread, so its sockets make the calls directly (`syscall(2)`, which is no
//! cancellation point): 2.4 % of a one-worker proxy's CPU in those wrappers under load
//! became 1.2 % (BENCHMARKS.md, twenty-fourth part). Readiness is tokio's, through
//! [`AsyncFd`], and follows tokio's own `TcpStream`: a short read or write means the
//! socket's buffer was drained or filled, so readiness is cleared without another call.
//! On other systems the libc wrappers are used.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// A listening socket whose accepted connections are [`Socket`]s.
pub(crate) struct Listener {
    fd: AsyncFd<std::net::TcpListener>,
}

impl Listener {
    /// Takes over tokio's listener (which leaves tokio's reactor for this one's).
    pub(crate) fn new(listener: tokio::net::TcpListener) -> io::Result<Listener> {
        let listener = listener.into_std()?;
        Ok(Listener {
            fd: register(listener)?,
        })
    }

    /// The next connection and its peer, non-blocking and close-on-exec from the start.
    pub(crate) async fn accept(&self) -> io::Result<(Socket, SocketAddr)> {
        loop {
            let mut guard = self.fd.readable().await?;
            if let Ok(accepted) = guard.try_io(|l| sys::accept(l.as_raw_fd())) {
                let (stream, peer) = accepted?;
                return Ok((Socket::from_std(stream)?, peer));
            }
        }
    }
}

/// A connected TCP stream: tokio's `TcpStream` without the libc wrappers.
pub(crate) struct Socket {
    fd: AsyncFd<std::net::TcpStream>,
}

impl Socket {
    /// Registers a connected, non-blocking stream with the runtime's reactor.
    fn from_std(stream: std::net::TcpStream) -> io::Result<Socket> {
        Ok(Socket { fd: register(stream)? })
    }

    /// Takes over tokio's stream (which leaves tokio's reactor for this one's).
    pub(crate) fn new(stream: tokio::net::TcpStream) -> io::Result<Socket> {
        Socket::from_std(stream.into_std()?)
    }

    /// The underlying stream, for socket options.
    pub(crate) fn get_ref(&self) -> &std::net::TcpStream {
        self.fd.get_ref()
    }

    /// Reads what has arrived without waiting; `WouldBlock` when nothing has (and, as with
    /// tokio's `try_read`, without a system call when the reactor reported nothing new).
    pub(crate) fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.fd.try_io(Interest::READABLE, |s| {
            sys::recv(s.as_raw_fd(), buf.as_mut_ptr(), buf.len())
        })
    }
}

fn register<T: AsRawFd>(io: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `io` owns its descriptor (a std socket), and the `AsyncFd` owns `io` until it
    // is dropped, so the descriptor stays open and the same for the registration's life.
    unsafe { AsyncFd::register(io) }.map_err(|e| e.into_parts().1)
}

impl AsyncRead for Socket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            // SAFETY: `recv` only writes into the spare bytes, and `assume_init` below
            // covers only the `n` it reports written.
            let spare = unsafe { buf.unfilled_mut() };
            let len = spare.len();
            match guard.try_io(|s| sys::recv(s.as_raw_fd(), spare.as_mut_ptr().cast(), len)) {
                Ok(Ok(n)) => {
                    if 0 < n && n < len {
                        guard.clear_ready();
                    }
                    // SAFETY: the kernel wrote the first `n` spare bytes.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // `WouldBlock`: readiness is cleared; wait for the next event.
                Err(_) => continue,
            }
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|s| sys::send(s.as_raw_fd(), buf)) {
                Ok(Ok(n)) => {
                    if 0 < n && n < buf.len() {
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(n));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_) => continue,
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|s| sys::send_vectored(s.as_raw_fd(), bufs)) {
                Ok(result) => return Poll::Ready(result),
                Err(_) => continue,
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.fd.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(target_os = "linux")]
mod sys {
    //! The calls, made with `syscall(2)`; `EINTR` is retried as the kernel would have with
    //! `SA_RESTART`.
    use std::io;
    use std::net::SocketAddr;
    use std::os::fd::{FromRawFd, RawFd};

    fn result(r: libc::c_long) -> io::Result<usize> {
        usize::try_from(r).map_err(|_| io::Error::last_os_error())
    }

    fn retried(mut call: impl FnMut() -> libc::c_long) -> io::Result<usize> {
        loop {
            match result(call()) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    pub(super) fn recv(fd: RawFd, buf: *mut u8, len: usize) -> io::Result<usize> {
        // SAFETY: `buf` is valid for `len` writable bytes (the caller's spare buffer); null
        // address arguments ask for no peer address.
        retried(|| unsafe {
            libc::syscall(
                libc::SYS_recvfrom,
                fd,
                buf,
                len,
                0,
                std::ptr::null_mut::<libc::sockaddr>(),
                std::ptr::null_mut::<libc::socklen_t>(),
            )
        })
    }

    pub(super) fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for reading `buf.len()` bytes; no destination address.
        retried(|| unsafe {
            libc::syscall(
                libc::SYS_sendto,
                fd,
                buf.as_ptr(),
                buf.len(),
                libc::MSG_NOSIGNAL,
                std::ptr::null::<libc::sockaddr>(),
                0 as libc::socklen_t,
            )
        })
    }

    pub(super) fn send_vectored(fd: RawFd, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: an all-zero msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        // `IoSlice` is ABI-compatible with `iovec` on Unix; the kernel only reads them.
        msg.msg_iov = bufs.as_ptr().cast_mut().cast();
        msg.msg_iovlen = bufs.len().min(libc::UIO_MAXIOV as usize);
        // SAFETY: `msg` points at `bufs`, valid for reading for the call's duration.
        retried(|| unsafe { libc::syscall(libc::SYS_sendmsg, fd, &msg as *const libc::msghdr, libc::MSG_NOSIGNAL) })
    }

    pub(super) fn accept(fd: RawFd) -> io::Result<(std::net::TcpStream, SocketAddr)> {
        // SAFETY: socket2 hands a zeroed address buffer and its size, which accept4 fills
        // in and updates; the flags make the new descriptor non-blocking and close-on-exec.
        let (conn, peer) = unsafe {
            socket2::SockAddr::try_init(|addr, len| {
                retried(|| {
                    libc::syscall(
                        libc::SYS_accept4,
                        fd,
                        addr,
                        len,
                        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    )
                })
            })
        }?;
        let conn = RawFd::try_from(conn).map_err(|_| io::Error::other("accept4 returned no descriptor"))?;
        // SAFETY: accept4 returned a new descriptor this process owns and nothing else holds.
        let stream = unsafe { std::net::TcpStream::from_raw_fd(conn) };
        let peer = peer
            .as_socket()
            .ok_or_else(|| io::Error::other("accepted a connection without an IP peer"))?;
        Ok((stream, peer))
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    //! The libc wrappers, as std would call them.
    use std::io;
    use std::net::SocketAddr;
    use std::os::fd::{BorrowedFd, RawFd};

    fn result(r: isize) -> io::Result<usize> {
        usize::try_from(r).map_err(|_| io::Error::last_os_error())
    }

    pub(super) fn recv(fd: RawFd, buf: *mut u8, len: usize) -> io::Result<usize> {
        // SAFETY: `buf` is valid for `len` writable bytes.
        result(unsafe { libc::recv(fd, buf.cast(), len, 0) })
    }

    pub(super) fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for reading `buf.len()` bytes.
        result(unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), 0) })
    }

    pub(super) fn send_vectored(fd: RawFd, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        use std::io::Write;
        // SAFETY: the descriptor is open for the call (its owner is borrowed by the caller).
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        socket2::SockRef::from(&fd).write_vectored(bufs)
    }

    pub(super) fn accept(fd: RawFd) -> io::Result<(std::net::TcpStream, SocketAddr)> {
        // SAFETY: the descriptor is open for the call (its owner is borrowed by the caller).
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let (socket, peer) = socket2::SockRef::from(&fd).accept()?;
        socket.set_nonblocking(true)?;
        let peer = peer
            .as_socket()
            .ok_or_else(|| io::Error::other("accepted a connection without an IP peer"))?;
        Ok((socket.into(), peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes both ways, a vectored write, a short read that must not lose the readiness
    /// of what arrives next, `try_read` on an empty socket, and the peer's close.
    #[tokio::test]
    async fn carries_bytes_both_ways_and_sees_the_close() {
        let listener = Listener::new(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()).unwrap();
        let addr = listener.fd.get_ref().local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(b"hello").await.unwrap();
            let mut got = [0u8; 11];
            c.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"world, too!");
            // After a pause, so the server's first read was a short one.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            c.write_all(b"more").await.unwrap();
            c.shutdown().await.unwrap();
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).await.unwrap();
            rest
        });
        let (mut s, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), std::net::Ipv4Addr::LOCALHOST);
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(s.try_read(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        let parts = [io::IoSlice::new(b"world"), io::IoSlice::new(b", too!")];
        assert_eq!(s.write_vectored(&parts).await.unwrap(), 11);
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"more");
        assert_eq!(s.read(&mut buf).await.unwrap(), 0, "the client's close");
        s.write_all(b"bye").await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(client.await.unwrap(), b"bye");
    }
}
