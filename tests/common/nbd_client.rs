//! A minimal synchronous NBD client (fixed newstyle handshake, `NBD_OPT_EXPORT_NAME`, simple
//! replies), for tests that need to know the fate of every single write: qemu-io reports a
//! batch, not which request of it was answered.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
const FLAG_C_NO_ZEROES: u32 = 2;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_EXPORT_NAME: u32 = 1;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;

pub struct NbdClient {
    stream: TcpStream,
    next_handle: u64,
    pub size_bytes: u64,
}

/// What became of a request.
#[derive(Debug)]
pub enum Outcome {
    /// The server answered with this NBD error code (0: success).
    Answered(u32),
    /// No answer: the connection failed or timed out. The request may or may not have happened.
    Unanswered(io::Error),
}

impl NbdClient {
    /// Connects and negotiates `export`; every later read waits at most `timeout`.
    pub fn connect(address: SocketAddr, export: &str, timeout: Duration) -> io::Result<NbdClient> {
        let stream = TcpStream::connect_timeout(&address, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        let mut c = NbdClient { stream, next_handle: 1, size_bytes: 0 };
        let magic = c.u64()?;
        let opt = c.u64()?;
        if magic != NBDMAGIC || opt != IHAVEOPT {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not a newstyle NBD server"));
        }
        let server_flags = c.u16()?;
        let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
        let flags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        let mut out = flags.to_be_bytes().to_vec();
        out.extend(IHAVEOPT.to_be_bytes());
        out.extend(OPT_EXPORT_NAME.to_be_bytes());
        out.extend((export.len() as u32).to_be_bytes());
        out.extend(export.as_bytes());
        c.stream.write_all(&out)?;
        c.size_bytes = c.u64()?;
        let _transmission_flags = c.u16()?;
        if !no_zeroes {
            let mut zeroes = [0u8; 124];
            c.stream.read_exact(&mut zeroes)?;
        }
        Ok(c)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Outcome {
        self.request(CMD_WRITE, offset, data.len() as u32, data, None)
    }

    pub fn flush(&mut self) -> Outcome {
        self.request(CMD_FLUSH, 0, 0, &[], None)
    }

    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Outcome {
        let len = buf.len() as u32;
        self.request(CMD_READ, offset, len, &[], Some(buf))
    }

    fn request(&mut self, kind: u16, offset: u64, len: u32, data: &[u8], read_into: Option<&mut [u8]>) -> Outcome {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut out = Vec::with_capacity(28 + data.len());
        out.extend(REQUEST_MAGIC.to_be_bytes());
        out.extend(0u16.to_be_bytes());
        out.extend(kind.to_be_bytes());
        out.extend(handle.to_be_bytes());
        out.extend(offset.to_be_bytes());
        out.extend(len.to_be_bytes());
        out.extend(data);
        let result = self.stream.write_all(&out).and_then(|()| {
            let magic = self.u32()?;
            let error = self.u32()?;
            let answered = self.u64()?;
            if magic != SIMPLE_REPLY_MAGIC || answered != handle {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected reply"));
            }
            if let (0, Some(buf)) = (error, read_into) {
                self.stream.read_exact(buf)?;
            }
            Ok(error)
        });
        match result {
            Ok(error) => Outcome::Answered(error),
            Err(e) => Outcome::Unanswered(e),
        }
    }

    fn u16(&mut self) -> io::Result<u16> {
        let mut b = [0u8; 2];
        self.stream.read_exact(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }

    fn u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.stream.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.stream.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }
}
