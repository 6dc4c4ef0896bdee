//! The byte streams a connection runs over - TCP and Unix sockets, plain or under
//! TLS after `STARTTLS` - split into a read half and a write half so that one thread
//! reads requests while others send replies.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::sendfile::sendfile;
use nix::sys::socket::{send, setsockopt, sockopt::SndBuf, MsgFlags};

use crate::limits::SEND_BUFFER_BYTES;
use crate::tls::TlsStream;

/// An accepted socket, TCP or Unix.
#[derive(Debug)]
pub enum Socket {
    /// TCP.
    Tcp(TcpStream),
    /// A Unix socket.
    Unix(UnixStream),
}

impl Socket {
    /// Another handle to the same socket (timeouts and shutdowns apply to both).
    pub fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
        })
    }

    /// Shuts the socket down in direction `how`.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.shutdown(how),
            Socket::Unix(s) => s.shutdown(how),
        }
    }

    /// Sets how long a read may wait (None: forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_read_timeout(t),
            Socket::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// How long a read may wait (None: forever).
    pub fn read_timeout(&self) -> io::Result<Option<Duration>> {
        match self {
            Socket::Tcp(s) => s.read_timeout(),
            Socket::Unix(s) => s.read_timeout(),
        }
    }

    /// Sets how long a write may wait (None: forever).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_write_timeout(t),
            Socket::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// Readies the socket for replies: on TCP, Nagle's algorithm off (replies go
    /// out at once; the kernel's send buffer autotuning stays: a fixed size was no
    /// faster and cost more CPU); on a Unix socket, a send buffer of
    /// [`SEND_BUFFER_BYTES`], so that a large reply is queued whole (measured:
    /// `nbdcopy -C 1` 1.1-1.2x faster).
    fn tune_for_replies(&self) {
        match self {
            Socket::Tcp(s) => {
                let _ = s.set_nodelay(true);
            }
            Socket::Unix(s) => {
                let _ = setsockopt(s, SndBuf, &SEND_BUFFER_BYTES);
            }
        }
    }
}

// Plain `read`/`write` only: std sends with MSG_NOSIGNAL, while its vectored
// writes (`writev`) would raise SIGPIPE in a host that has not ignored it.
impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.read(buf),
            Socket::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write(buf),
            Socket::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Tcp(s) => s.as_fd(),
            Socket::Unix(s) => s.as_fd(),
        }
    }
}

/// Most bytes one `sendfile` call is asked for (the kernel moves at most about
/// 2 GiB at once anyway).
const SENDFILE_CHUNK: u64 = 1 << 30;

/// The socket of a plaintext connection, for replies that carry host file bytes
/// without reading them: the kernel moves them from the page cache to the socket
/// (`sendfile`), one copy fewer than read-then-write (measured on loopback:
/// Unix sockets 1.6-2.4x the bytes per second). A send after the client has gone
/// raises `SIGPIPE` (`sendfile` has no `MSG_NOSIGNAL`): the process must ignore it,
/// as every Rust program does from `main` on.
#[derive(Debug)]
pub(crate) struct FileSender(Socket);

impl FileSender {
    /// Sends all of `bytes`; `more` says more of the same reply follows (TCP then
    /// holds a partial segment back).
    pub(crate) fn send(&self, mut bytes: &[u8], more: bool) -> io::Result<()> {
        let mut flags = MsgFlags::MSG_NOSIGNAL;
        if more {
            flags |= MsgFlags::from_bits_retain(nix::libc::MSG_MORE);
        }
        while !bytes.is_empty() {
            match send(self.0.as_fd().as_raw_fd(), bytes, flags) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Sends `len` bytes of the file `fd` from byte `offset`. A file that ends
    /// before is an error (the reply is then cut short: the caller ends the
    /// connection).
    pub(crate) fn send_file(&self, fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
        let mut at = i64::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let mut left = len;
        while left > 0 {
            let want = left.min(SENDFILE_CHUNK) as usize;
            match sendfile(&self.0, fd, Some(&mut at), want) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the file ends at byte {at}, {left} bytes short"),
                    ))
                }
                Ok(n) => left -= n as u64,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// An accepted connection: its socket, plain or under TLS.
#[derive(Debug)]
pub enum Transport {
    /// Plaintext.
    Plain(Socket),
    /// TLS, started by `STARTTLS` during negotiation.
    Tls(TlsStream),
}

impl From<TcpStream> for Transport {
    fn from(s: TcpStream) -> Transport {
        Transport::Plain(Socket::Tcp(s))
    }
}

impl From<UnixStream> for Transport {
    fn from(s: UnixStream) -> Transport {
        Transport::Plain(Socket::Unix(s))
    }
}

/// A handle that can end a connection from another thread (server shutdown). It
/// acts on the socket, so it works the same before and after `STARTTLS`.
#[derive(Debug)]
pub struct Closer(Socket);

impl Closer {
    /// Shuts the connection down both ways: a thread blocked reading or writing it
    /// returns.
    pub fn close(&self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }

    /// Stops reading: the reader sees the end of the stream, replies still go out.
    pub fn stop_reading(&self) {
        let _ = self.0.shutdown(Shutdown::Read);
    }
}

impl Transport {
    /// The socket underneath (under TLS: the one the reading side uses).
    fn socket(&self) -> &Socket {
        match self {
            Transport::Plain(s) => s,
            Transport::Tls(t) => t.socket(),
        }
    }

    /// Sets how long a read may wait (None: forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.socket().set_read_timeout(t)
    }

    /// Sets how long a write may wait without progress (None: forever).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.socket().set_write_timeout(t)
    }

    /// A handle to end the connection from elsewhere.
    pub fn closer(&self) -> io::Result<Closer> {
        Ok(Closer(self.socket().try_clone()?))
    }

    /// A sender of file bytes for a plaintext connection (none under TLS, whose
    /// records the process must encrypt itself).
    pub(crate) fn file_sender(&self) -> io::Result<Option<FileSender>> {
        match self {
            Transport::Plain(s) => Ok(Some(FileSender(s.try_clone()?))),
            Transport::Tls(_) => Ok(None),
        }
    }

    /// The read half and the write half.
    pub fn split(self) -> io::Result<(Box<dyn Read + Send>, Box<dyn Write + Send>)> {
        self.socket().tune_for_replies();
        Ok(match self {
            Transport::Plain(s) => (Box::new(s.try_clone()?), Box::new(s)),
            Transport::Tls(t) => {
                let (r, w) = t.split();
                (Box::new(r), Box::new(w))
            }
        })
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.read(buf),
            Transport::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.write(buf),
            Transport::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.flush(),
            Transport::Tls(t) => t.flush(),
        }
    }
}
