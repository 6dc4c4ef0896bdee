//! The byte streams a connection runs over (TCP, Unix sockets), split into a read
//! half and a write half so that one thread reads requests while others send
//! replies.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// An accepted connection.
#[derive(Debug)]
pub enum Transport {
    /// TCP (Nagle off: replies go out at once).
    Tcp(TcpStream),
    /// A Unix socket.
    Unix(UnixStream),
}

/// A handle that can end a connection from another thread (server shutdown).
#[derive(Debug)]
pub enum Closer {
    /// TCP.
    Tcp(TcpStream),
    /// Unix socket.
    Unix(UnixStream),
}

impl Closer {
    /// Shuts the connection down both ways: a thread blocked reading it returns.
    pub fn close(&self) {
        let _ = match self {
            Closer::Tcp(s) => s.shutdown(Shutdown::Both),
            Closer::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Stops reading: the reader sees the end of the stream, replies still go out.
    pub fn stop_reading(&self) {
        let _ = match self {
            Closer::Tcp(s) => s.shutdown(Shutdown::Read),
            Closer::Unix(s) => s.shutdown(Shutdown::Read),
        };
    }
}

impl Transport {
    /// Sets how long a read may wait (None: forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Transport::Tcp(s) => s.set_read_timeout(t),
            Transport::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Sets how long a write may wait without progress (None: forever).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Transport::Tcp(s) => s.set_write_timeout(t),
            Transport::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// A handle to end the connection from elsewhere.
    pub fn closer(&self) -> io::Result<Closer> {
        Ok(match self {
            Transport::Tcp(s) => Closer::Tcp(s.try_clone()?),
            Transport::Unix(s) => Closer::Unix(s.try_clone()?),
        })
    }

    /// The read half and the write half.
    pub fn split(self) -> io::Result<(Box<dyn Read + Send>, Box<dyn Write + Send>)> {
        Ok(match self {
            Transport::Tcp(s) => {
                let _ = s.set_nodelay(true);
                (Box::new(s.try_clone()?), Box::new(s))
            }
            Transport::Unix(s) => (Box::new(s.try_clone()?), Box::new(s)),
        })
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Tcp(s) => s.read(buf),
            Transport::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Tcp(s) => s.write(buf),
            Transport::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Tcp(s) => s.flush(),
            Transport::Unix(s) => s.flush(),
        }
    }
}
