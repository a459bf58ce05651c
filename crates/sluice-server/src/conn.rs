//! The connection limit: a listener that holds one permit of `server.max_connections` per open
//! TCP connection (requests, event streams and WebSockets alike), and can close every open
//! connection at the end of the shutdown grace period.
//!
//! At the limit, the listener stops accepting until a connection closes: new connections wait
//! in the kernel's listen backlog (as in mini-redis), instead of costing the server a task and
//! a socket each. Event streams have their own, lower limit (`server.max_streams`, a 503), so
//! a server full of streams still answers API calls.
//!
//! Each connection also gets its own [`HeadTimer`], hyper's timer for the header read timeout,
//! which tells the two waits for a request head apart: the first request of a connection must
//! arrive in full within `server.header_timeout` of the accept; after a response, the
//! connection may stay idle for `server.idle_timeout`, and once the first byte of the next
//! request arrives, its head must be complete within `server.header_timeout`. hyper waits for a
//! head only between requests, so neither timeout ever cuts a response in progress (an event
//! stream) nor an upgraded WebSocket.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// `TCP_NOTSENT_LOWAT` of every accepted socket: the kernel takes more of a response only while
/// less than this of what it already took is still unsent. Without it, Linux grows a socket's
/// send buffer up to `net.ipv4.tcp_wmem`'s maximum (4 MiB by default) for a reader that stops
/// reading, so each stalled event stream held about 4 MiB of kernel memory; with it, what is in
/// flight (bounded by the reader's receive window) and at most about this much more. The send
/// buffer still grows for fast, distant readers: only the unsent part is bounded, the window
/// is not.
const NOTSENT_LOWAT: u32 = 128 * 1024;

/// The open connections of one server.
#[derive(Debug, Default)]
pub(crate) struct Connections {
    open: AtomicU64,
    next_id: AtomicU64,
    closing: AtomicBool,
    /// Wakers of every open connection's reads and writes, to close them all at once.
    wakers: Mutex<HashMap<u64, Arc<Wakers>>>,
}

#[derive(Debug, Default)]
struct Wakers {
    read: AtomicWaker,
    write: AtomicWaker,
}

impl Connections {
    /// Connections open now.
    pub(crate) fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Fails every further read and write of every connection (the hard end of shutdown):
    /// their tasks see an error and end.
    pub(crate) fn close_all(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let wakers: Vec<Arc<Wakers>> = self
            .wakers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for w in wakers {
            w.read.wake();
            w.write.wake();
        }
    }

    fn closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }
}

/// A [`TcpListener`] admitting at most `max` connections at once.
pub(crate) struct LimitedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    connections: Arc<Connections>,
}

impl LimitedListener {
    pub(crate) fn new(inner: TcpListener, max: usize, connections: Arc<Connections>) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(max.clamp(1, Semaphore::MAX_PERMITS))),
            connections,
        }
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // The semaphore is never closed; were it, accept nothing more.
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            return std::future::pending().await;
        };
        // Errors (e.g. out of file descriptors) are retried inside, with a pause.
        let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        // Event streams write small frames as they happen: Nagle's algorithm would hold one back
        // until the previous is acknowledged (up to a delayed ACK, 40 ms on Linux). The encoder
        // already batches what is ready into one write.
        if let Err(e) = io.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        if let Err(e) = socket2::SockRef::from(&io).set_tcp_notsent_lowat(NOTSENT_LOWAT) {
            tracing::debug!(error = %e, "could not set TCP_NOTSENT_LOWAT");
        }
        (LimitedIo::new(io, permit, self.connections.clone()), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// One admitted connection: the socket, its permit, and its place in [`Connections`].
pub(crate) struct LimitedIo {
    io: TcpStream,
    id: u64,
    wakers: Arc<Wakers>,
    connections: Arc<Connections>,
    /// Reads that returned data, for the connection's [`HeadTimer`].
    reads: Arc<AtomicU64>,
    _permit: OwnedSemaphorePermit,
}

impl LimitedIo {
    fn new(io: TcpStream, permit: OwnedSemaphorePermit, connections: Arc<Connections>) -> Self {
        let id = connections.next_id.fetch_add(1, Ordering::Relaxed);
        let wakers = Arc::new(Wakers::default());
        connections
            .wakers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, wakers.clone());
        connections.open.fetch_add(1, Ordering::Relaxed);
        Self {
            io,
            id,
            wakers,
            connections,
            reads: Arc::default(),
            _permit: permit,
        }
    }

    /// The timer of hyper's header read timeout for this connection (see the module docs).
    pub(crate) fn head_timer(&self, header_timeout: Duration, idle_timeout: Duration) -> HeadTimer {
        HeadTimer {
            header_timeout,
            idle_timeout,
            reads: self.reads.clone(),
            first_head: AtomicBool::new(true),
        }
    }

    /// Polls `op` unless the server closes its connections; registers the task to be woken
    /// when it does.
    fn guard<T>(
        &mut self,
        cx: &mut Context<'_>,
        write: bool,
        op: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if self.connections.closing() {
            return Poll::Ready(Err(closed()));
        }
        match op(Pin::new(&mut self.io), cx) {
            Poll::Pending => {
                let w = if write {
                    &self.wakers.write
                } else {
                    &self.wakers.read
                };
                w.register(cx.waker());
                // `close_all` sets the flag before waking: checking after registering
                // cannot miss it.
                if self.connections.closing() {
                    Poll::Ready(Err(closed()))
                } else {
                    Poll::Pending
                }
            }
            ready => ready,
        }
    }
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection closed at the end of the shutdown grace period",
    )
}

impl Drop for LimitedIo {
    fn drop(&mut self) {
        self.connections
            .wakers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        self.connections.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for LimitedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = self.get_mut();
        let polled = this.guard(cx, false, |io, cx| io.poll_read(cx, buf));
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.reads.fetch_add(1, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for LimitedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .guard(cx, true, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .guard(cx, true, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().guard(cx, true, |io, cx| io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// hyper's timer for one connection, used only for its header read timeout: hyper starts a
/// sleep each time it begins to wait for a request head, and ends the connection if the sleep
/// finishes before the head is complete.
///
/// The first wait keeps hyper's deadline (`header_timeout` after the accept). Every later one
/// comes right after a response, on an idle keep-alive connection: it lasts `idle_timeout`
/// while nothing arrives, and becomes `header_timeout` from the first byte read.
pub(crate) struct HeadTimer {
    header_timeout: Duration,
    idle_timeout: Duration,
    reads: Arc<AtomicU64>,
    first_head: AtomicBool,
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeadWait::fixed(tokio::time::sleep(duration)))
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        if self.first_head.swap(false, Ordering::Relaxed) {
            let deadline = tokio::time::Instant::from_std(deadline);
            return Box::pin(HeadWait::fixed(tokio::time::sleep_until(deadline)));
        }
        Box::pin(HeadWait {
            sleep: Box::pin(tokio::time::sleep(self.idle_timeout)),
            idle: Some(Idle {
                reads_at_start: self.reads.load(Ordering::Relaxed),
                reads: self.reads.clone(),
                header_timeout: self.header_timeout,
            }),
        })
    }
}

/// One wait for a request head.
struct HeadWait {
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// While the connection is idle: what turns the wait into the header timeout.
    idle: Option<Idle>,
}

struct Idle {
    reads_at_start: u64,
    reads: Arc<AtomicU64>,
    header_timeout: Duration,
}

impl HeadWait {
    fn fixed(sleep: tokio::time::Sleep) -> Self {
        Self {
            sleep: Box::pin(sleep),
            idle: None,
        }
    }
}

impl Future for HeadWait {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        // hyper polls this after every read that leaves the head incomplete, so the first byte
        // is seen as it arrives.
        if let Some(idle) = &this.idle
            && idle.reads.load(Ordering::Relaxed) != idle.reads_at_start
        {
            let deadline = tokio::time::Instant::now() + idle.header_timeout;
            this.idle = None;
            this.sleep.as_mut().reset(deadline);
        }
        this.sleep.as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for HeadWait {}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_send_at_once_and_bound_what_waits_unsent() {
        let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        let mut listener = LimitedListener::new(inner, 4, Arc::new(Connections::default()));
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = axum::serve::Listener::accept(&mut listener).await;
        let socket = socket2::SockRef::from(&accepted.io);
        assert!(socket.tcp_nodelay().unwrap());
        assert_eq!(socket.tcp_notsent_lowat().unwrap(), NOTSENT_LOWAT);
    }
}
