//! The byte streams a connection runs over - TCP and Unix sockets, plain or under
//! TLS after `STARTTLS` - split into a read half and a write half so that one thread
//! reads requests while others send replies.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt::SndBuf};

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
