//! The HTTP server loop under the router: what a client can make the daemon
//! hold, bounded in time and in count.
//!
//! - **Connections**: at most `max_connections` per listener; one more is
//!   answered `503 too_many_connections` and closed at once (it never waits,
//!   so a flood of idle sockets cannot starve `/healthz` or the module
//!   watcher of file descriptors).
//! - **Time**: a connection waiting for a request head (a new one, or idle
//!   between keep-alive requests) is closed after `header_timeout`; a write
//!   the client does not take for `write_timeout` (a follower that stopped
//!   reading) cuts the connection; request bodies are read within
//!   `body_timeout` (see [`super::read_body`]).
//! - **Shutdown**: the listeners stop accepting, idle keep-alive connections
//!   close, followers end their streams cleanly and read-your-writes waiters
//!   answer `503 shutting_down` (both watch [`super::AppState::shutdown`]);
//!   whatever is still open after `shutdown_grace` is cut. A stop therefore
//!   finishes within the grace period whatever the clients do.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Sleep;

/// The bounds one listener enforces.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub write_timeout: Duration,
    pub shutdown_grace: Duration,
}

/// Serves `app` on `listener` until `shutdown` turns true, then drains as
/// the module docs say and returns once every connection is closed or cut.
pub async fn run(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut conns = JoinSet::new();
    let (drain_tx, drain_rx) = watch::channel(false);
    loop {
        while conns.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = async { drop(shutdown.wait_for(|s| *s).await) } => break,
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of file descriptors, most likely: wait a little
                // instead of spinning on the error.
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            conns.spawn(refuse(tcp, limits.max_connections));
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let io = TokioIo::new(WriteTimeout::new(tcp, limits.write_timeout));
        let mut drain = drain_rx.clone();
        conns.spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let conn = builder.serve_connection(io, service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = async { drop(drain.wait_for(|d| *d).await) } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!("connection closed: {e}");
            }
        });
    }
    drop(listener);
    let _ = drain_tx.send(true);
    let open = conns.len();
    let drained = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(limits.shutdown_grace, drained)
        .await
        .is_err()
    {
        tracing::warn!(
            open,
            still_open = conns.len(),
            "cutting the connections still open {:?} after the shutdown began",
            limits.shutdown_grace
        );
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
}

/// Answers a connection over the cap with a complete `503` and closes it.
async fn refuse(mut tcp: TcpStream, max: usize) {
    let body = format!(
        "{{\"error\":{{\"code\":\"too_many_connections\",\"message\":\"the server \
         already holds its limit of {max} connections (max_connections); retry \
         later\",\"limit\":{max}}}}}"
    );
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let send = async {
        tcp.write_all(answer.as_bytes()).await?;
        tcp.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), send).await;
}

/// A socket whose writes fail with `TimedOut` once one has waited
/// `timeout` for the client to take data: a reader that stopped reading is
/// cut instead of pinning its buffers for ever. Reads are left to hyper's
/// header timeout and the body timeout.
///
/// It also gives the errors hyper answers by itself, before a request
/// reaches kiln (`400` for what is not HTTP/1.1, `414`, `431`), the JSON
/// body every other error has: their answer head is recognised as hyper
/// writes it and replaced whole (see [`hyper_error_answer`]).
pub struct WriteTimeout<T> {
    inner: T,
    timeout: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// A replacement answer being written: its bytes, how many are sent,
    /// and the length of the write it stands for.
    rewrite: Option<(Vec<u8>, usize, usize)>,
}

impl<T> WriteTimeout<T> {
    pub fn new(inner: T, timeout: Duration) -> Self {
        WriteTimeout {
            inner,
            timeout,
            timer: None,
            rewrite: None,
        }
    }

    fn on_poll<R>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if poll.is_ready() {
            self.timer = None;
            return poll;
        }
        let timeout = self.timeout;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client took no data for {timeout:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> WriteTimeout<T> {
    /// Writes the replacement answer standing for a write of `buf`, if
    /// `buf` is hyper's own error answer (or one is being written).
    fn poll_rewrite(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Option<Poll<io::Result<usize>>> {
        if self.rewrite.is_none() {
            let answer = hyper_error_answer(buf)?;
            self.rewrite = Some((answer, 0, buf.len()));
        }
        loop {
            let (bytes, sent, stands_for) = self.rewrite.take()?;
            if sent == bytes.len() {
                self.timer = None;
                return Some(Poll::Ready(Ok(stands_for)));
            }
            let poll = Pin::new(&mut self.inner).poll_write(cx, &bytes[sent..]);
            match self.on_poll(cx, poll) {
                Poll::Ready(Ok(n)) if n > 0 => self.rewrite = Some((bytes, sent + n, stands_for)),
                Poll::Ready(Ok(_)) => return Some(Poll::Ready(Ok(0))),
                Poll::Ready(Err(e)) => return Some(Poll::Ready(Err(e))),
                Poll::Pending => {
                    self.rewrite = Some((bytes, sent, stands_for));
                    return Some(Poll::Pending);
                }
            }
        }
    }
}

/// hyper's own answer to a request it could not read (`400`, `414`, `431`,
/// written as `HTTP/1.1 <status>\r\nconnection: close\r\ncontent-length: 0`),
/// as kiln's JSON error; `None` for anything else (kiln's own answers always
/// carry a content type and a body).
pub fn hyper_error_answer(head: &[u8]) -> Option<Vec<u8>> {
    const TAIL: &[u8] = b"\r\nconnection: close\r\ncontent-length: 0\r\n";
    let (status, code, message) = [
        (
            "400 Bad Request",
            "malformed_request",
            "the request is not valid HTTP/1.1",
        ),
        (
            "414 URI Too Long",
            "uri_too_long",
            "the request's URI is longer than the server reads",
        ),
        (
            "431 Request Header Fields Too Large",
            "headers_too_large",
            "the request's headers are larger than the server reads",
        ),
    ]
    .into_iter()
    .find(|(status, _, _)| {
        let line = format!("HTTP/1.1 {status}");
        head.starts_with(line.as_bytes()) && head[line.len()..].starts_with(TAIL)
    })?;
    let body = format!("{{\"error\":{{\"code\":\"{code}\",\"message\":\"{message}\"}}}}");
    Some(
        format!(
            "HTTP/1.1 {status}\r\nconnection: close\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(poll) = this.poll_rewrite(cx, buf) {
            return poll;
        }
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.on_poll(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(first) = bufs.first()
            && let Some(poll) = this.poll_rewrite(cx, first)
        {
            return poll;
        }
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.on_poll(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_flush(cx);
        this.on_poll(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
