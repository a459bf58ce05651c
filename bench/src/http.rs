//! A minimal HTTP/1.1 client over a raw `TcpStream`: the request bytes are written by hand and
//! the response body (chunked, sized or to-close) is decoded incrementally into the caller's
//! buffer, so an SSE body goes from the socket to the scanner with one copy.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail, ensure};
use memchr::memmem;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const READ_BUF: usize = 256 * 1024;
const MAX_HEAD: usize = 64 * 1024;

/// Wall-clock now in Unix nanoseconds (the clock the ticker's `t` uses).
pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The server under test: a loopback address.
#[derive(Debug, Clone)]
pub struct Target {
    /// Where to connect.
    pub addr: SocketAddr,
    host: String,
}

impl Target {
    /// Parses `http://127.0.0.1:PORT` (a path after it is ignored). Only loopback addresses are
    /// accepted: the bench never sends traffic off the machine.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("server URL: expected http://127.0.0.1:PORT, got {url:?}"))?;
        let host = rest.split('/').next().unwrap_or_default();
        let addr: SocketAddr = match host.strip_prefix("localhost:") {
            Some(port) => SocketAddr::from((
                [127, 0, 0, 1],
                port.parse::<u16>()
                    .with_context(|| format!("server URL {url:?}: bad port"))?,
            )),
            None => host
                .parse()
                .with_context(|| format!("server URL {url:?}: expected IP:PORT"))?,
        };
        ensure!(
            addr.ip().is_loopback(),
            "server URL {url:?}: only loopback addresses are benchmarked"
        );
        Ok(Self {
            addr,
            host: host.to_owned(),
        })
    }

    /// The base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.host)
    }

    /// Builds a request's bytes.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + body.len());
        out.extend_from_slice(method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(path.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(self.host.as_bytes());
        out.extend_from_slice(b"\r\nuser-agent: sluice-bench\r\n");
        for (k, v) in headers {
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if !body.is_empty() || method == "POST" {
            out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body);
        out
    }
}

/// One connection with its read buffer.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Unix nanoseconds when the last read returned.
    pub last_read_ns: u64,
    /// Bytes read from the socket.
    pub bytes_read: u64,
}

impl Conn {
    /// Connects (with `TCP_NODELAY`) within `timeout`.
    pub async fn connect(target: &Target, timeout: Duration) -> anyhow::Result<Self> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(target.addr))
            .await
            .map_err(|_| anyhow!("connect to {} timed out", target.addr))?
            .map_err(|e| {
                let hint = if e.raw_os_error() == Some(24) {
                    " (too many open files: raise `ulimit -n`)"
                } else {
                    ""
                };
                anyhow!("connect to {}: {e}{hint}", target.addr)
            })?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: vec![0; READ_BUF],
            start: 0,
            end: 0,
            last_read_ns: 0,
            bytes_read: 0,
        })
    }

    /// Writes a whole request.
    pub async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream
            .write_all(bytes)
            .await
            .context("writing the request")
    }

    /// Reads more bytes; `false` at end of stream.
    async fn fill(&mut self, idle: Duration) -> anyhow::Result<bool> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            if self.start == 0 {
                let len = self.buf.len();
                self.buf.resize(len * 2, 0);
            } else {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
        }
        let n = tokio::time::timeout(idle, self.stream.read(&mut self.buf[self.end..]))
            .await
            .map_err(|_| anyhow!("no bytes from the server for {idle:?}"))?
            .context("reading from the server")?;
        self.last_read_ns = unix_nanos();
        self.end += n;
        self.bytes_read += n as u64;
        Ok(n > 0)
    }

    /// Reads the response head.
    pub async fn read_head(mut self, idle: Duration) -> anyhow::Result<Response> {
        let head_end = loop {
            if let Some(p) = memmem::find(&self.buf[self.start..self.end], b"\r\n\r\n") {
                break self.start + p + 4;
            }
            ensure!(
                self.end - self.start < MAX_HEAD,
                "response head over {MAX_HEAD} bytes"
            );
            if !self.fill(idle).await? {
                bail!("the server closed the connection before answering");
            }
        };
        let head = std::str::from_utf8(&self.buf[self.start..head_end])
            .context("response head is not UTF-8")?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        ensure!(
            version.starts_with("HTTP/1."),
            "not an HTTP/1 response: {status_line:?}"
        );
        let status: u16 = parts
            .next()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("bad status line {status_line:?}"))?;
        let mut headers = Vec::new();
        for line in lines.filter(|l| !l.is_empty()) {
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        self.start = head_end;
        let get = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v);
        let framing = if status == 204 || status == 304 || (100..200).contains(&status) {
            Framing::Length(0)
        } else if get("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            Framing::Chunked(Chunked::default())
        } else if let Some(len) = get("content-length") {
            Framing::Length(len.parse().context("bad content-length")?)
        } else {
            Framing::Close
        };
        Ok(Response {
            status,
            head_ns: self.last_read_ns,
            headers,
            framing,
            conn: self,
            done: false,
        })
    }
}

/// A response whose body is read on demand.
#[derive(Debug)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Unix nanoseconds when the head was complete.
    pub head_ns: u64,
    headers: Vec<(String, String)>,
    framing: Framing,
    conn: Conn,
    done: bool,
}

impl Response {
    /// A header by lower-case name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The run a streaming create started: `X-Sluice-Run-Id`, else the id in `Location`.
    pub fn run_id(&self) -> Option<String> {
        self.header("x-sluice-run-id")
            .map(str::to_owned)
            .or_else(|| {
                self.header("location")
                    .and_then(|l| l.strip_prefix("/v1/runs/"))
                    .map(str::to_owned)
            })
    }

    /// Appends the next decoded body bytes to `out`, reading the socket when nothing is
    /// buffered. Returns the Unix-nanosecond time of the read that brought them, or `None` at
    /// the end of the body.
    pub async fn next_body(
        &mut self,
        out: &mut Vec<u8>,
        idle: Duration,
    ) -> anyhow::Result<Option<u64>> {
        loop {
            if self.done {
                return Ok(None);
            }
            let before = out.len();
            let input = &self.conn.buf[self.conn.start..self.conn.end];
            let used = self.framing.decode(input, out)?;
            self.conn.start += used;
            if self.framing.is_done() {
                self.done = true;
            }
            if out.len() > before {
                return Ok(Some(self.conn.last_read_ns));
            }
            if self.done {
                return Ok(None);
            }
            if !self.conn.fill(idle).await? {
                if matches!(self.framing, Framing::Close) {
                    self.done = true;
                    return Ok(None);
                }
                bail!("the server closed the connection in the middle of the body");
            }
        }
    }

    /// Reads the rest of the body (up to `limit` bytes).
    pub async fn body(&mut self, idle: Duration, limit: usize) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::new();
        while self.next_body(&mut out, idle).await?.is_some() {
            ensure!(out.len() <= limit, "response body over {limit} bytes");
        }
        Ok(out)
    }

    /// The body as text, for error messages.
    pub async fn body_text(&mut self, idle: Duration) -> String {
        match self.body(idle, 64 * 1024).await {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) => format!("(body unreadable: {e:#})"),
        }
    }
}

#[derive(Debug)]
enum Framing {
    Chunked(Chunked),
    Length(u64),
    Close,
}

impl Framing {
    fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> anyhow::Result<usize> {
        match self {
            Self::Chunked(c) => c.decode(input, out),
            Self::Length(left) => {
                let take = input
                    .len()
                    .min(usize::try_from(*left).unwrap_or(usize::MAX));
                out.extend_from_slice(&input[..take]);
                *left -= take as u64;
                Ok(take)
            }
            Self::Close => {
                out.extend_from_slice(input);
                Ok(input.len())
            }
        }
    }

    fn is_done(&self) -> bool {
        match self {
            Self::Chunked(c) => c.state == ChunkState::Done,
            Self::Length(left) => *left == 0,
            Self::Close => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum ChunkState {
    #[default]
    Size,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    EndLf,
    Done,
}

/// An incremental `Transfer-Encoding: chunked` decoder.
#[derive(Debug, Default)]
pub struct Chunked {
    state: ChunkState,
    size: u64,
    digits: u8,
}

impl Chunked {
    /// Decodes as much of `input` as possible into `out`; returns the bytes consumed.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> anyhow::Result<usize> {
        let mut i = 0;
        while i < input.len() {
            if self.state == ChunkState::Data {
                let avail = input.len() - i;
                let take = avail.min(usize::try_from(self.size).unwrap_or(usize::MAX));
                out.extend_from_slice(&input[i..i + take]);
                i += take;
                self.size -= take as u64;
                if self.size == 0 {
                    self.state = ChunkState::DataCr;
                }
                continue;
            }
            let b = input[i];
            i += 1;
            match self.state {
                ChunkState::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let v = (b as char).to_digit(16).unwrap_or(0);
                        ensure!(self.digits < 15, "chunk size too large");
                        self.size = self.size * 16 + u64::from(v);
                        self.digits += 1;
                    }
                    b';' | b' ' | b'\t' => self.state = ChunkState::Ext,
                    b'\r' => self.state = ChunkState::SizeLf,
                    b'\n' => self.end_size()?,
                    _ => bail!("bad chunk size byte {b:#04x}"),
                },
                ChunkState::Ext => match b {
                    b'\r' => self.state = ChunkState::SizeLf,
                    b'\n' => self.end_size()?,
                    _ => {}
                },
                ChunkState::SizeLf => {
                    ensure!(b == b'\n', "chunk size line not ended by CRLF");
                    self.end_size()?;
                }
                ChunkState::DataCr => match b {
                    b'\r' => self.state = ChunkState::DataLf,
                    b'\n' => self.state = ChunkState::Size,
                    _ => bail!("chunk data not followed by CRLF"),
                },
                ChunkState::DataLf => {
                    ensure!(b == b'\n', "chunk data not followed by CRLF");
                    self.state = ChunkState::Size;
                }
                ChunkState::TrailerStart => match b {
                    b'\r' => self.state = ChunkState::EndLf,
                    b'\n' => self.state = ChunkState::Done,
                    _ => self.state = ChunkState::Trailer,
                },
                ChunkState::Trailer => {
                    if b == b'\n' {
                        self.state = ChunkState::TrailerStart;
                    }
                }
                ChunkState::EndLf => {
                    ensure!(b == b'\n', "chunked body not ended by CRLF");
                    self.state = ChunkState::Done;
                }
                ChunkState::Done => return Ok(i - 1),
                ChunkState::Data => {}
            }
        }
        Ok(i)
    }

    fn end_size(&mut self) -> anyhow::Result<()> {
        ensure!(self.digits > 0, "empty chunk size");
        self.digits = 0;
        self.state = if self.size == 0 {
            ChunkState::TrailerStart
        } else {
            ChunkState::Data
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_any_split() {
        let wire = b"5\r\nhello\r\n1;ext=1\r\n \r\n10\r\n0123456789abcdef\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for step in 1..wire.len() {
            let mut c = Chunked::default();
            let mut out = Vec::new();
            let mut used = 0;
            for piece in wire.chunks(step) {
                let mut off = 0;
                while off < piece.len() && c.state != ChunkState::Done {
                    off += c.decode(&piece[off..], &mut out).unwrap();
                }
                used += off;
                if c.state == ChunkState::Done {
                    break;
                }
            }
            assert_eq!(out, b"hello 0123456789abcdef", "split every {step}");
            assert_eq!(c.state, ChunkState::Done);
            assert_eq!(
                &wire[used..],
                b"NEXT",
                "stops at the end of the body ({step})"
            );
        }
        let mut c = Chunked::default();
        assert!(c.decode(b"zz\r\n", &mut Vec::new()).is_err());
    }

    #[test]
    fn targets_are_loopback_only() {
        assert!(Target::parse("http://127.0.0.1:8080").is_ok());
        assert!(Target::parse("http://localhost:9/x").is_ok());
        assert!(Target::parse("http://[::1]:9").is_ok());
        assert!(Target::parse("http://10.0.0.1:80").is_err());
        assert!(Target::parse("127.0.0.1:80").is_err());
    }
}
