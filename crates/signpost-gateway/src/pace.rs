//! A client must take its answer at some pace: one that stops reading is cut off after the idle
//! timeout, so it cannot hold its connection, and the instance's behind it, for ever.
//!
//! Two ways a client stops, two guards. A client that stops reading its socket leaves the
//! gateway's writes pending: [`Stall`] wraps the connection on hyper's path (HTTP/2, TLS,
//! requests with a body) and fails a write that has made no progress for the limit, which ends
//! the connection and drops every answer on it. An HTTP/2 client can instead keep reading its
//! socket and stop granting flow-control window to one stream; hyper then never polls that
//! answer's body again, so no timer inside the body would ever run. [`Paced`] gives such an
//! answer a watchdog task that drops the instance's side once the client has taken nothing for
//! the limit. (The gateway's own HTTP/1.1 path has its write deadline in `h1::send`.)

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use crate::upstream::{BoxError, ProxyBody};

/// A connection whose writes must make progress within `limit`.
pub(crate) struct Stall<I> {
    io: I,
    limit: Duration,
    /// Armed while a write is pending; made on the first one, as most connections never wait.
    timer: Option<Pin<Box<Sleep>>>,
    waiting: bool,
}

impl<I> Stall<I> {
    pub(crate) fn new(io: I, limit: Duration) -> Self {
        Stall {
            io,
            limit,
            timer: None,
            waiting: false,
        }
    }

    /// Passes on what a write returned. Only bytes taken are progress: a flush that is ready
    /// at once (a socket's always is) must not push the deadline out while the bytes wait.
    fn pace<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
        progress: impl FnOnce(&T) -> bool,
    ) -> Poll<io::Result<T>> {
        match result {
            Poll::Ready(Ok(value)) => {
                if progress(&value) {
                    self.waiting = false;
                }
                Poll::Ready(Ok(value))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => match self.wait(cx) {
                Poll::Ready(error) => Poll::Ready(Err(error)),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    /// A write is pending: arms the deadline if this wait is new, and is ready with an error
    /// once it has passed.
    fn wait(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let deadline = Instant::now() + self.limit;
        let timer = match &mut self.timer {
            Some(timer) => {
                if !self.waiting {
                    timer.as_mut().reset(deadline);
                }
                timer
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.waiting = true;
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client took no data for {:?}", self.limit),
        ))
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Stall<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Stall<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.io).poll_write(cx, buf);
        this.pace(cx, result, |n| *n > 0)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.pace(cx, result, |n| *n > 0)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.io).poll_flush(cx);
        this.pace(cx, result, |()| false)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.io).poll_shutdown(cx);
        this.pace(cx, result, |()| false)
    }
}

/// An answer to an HTTP/2 client, whose instance side is dropped by a watchdog once the client
/// has taken nothing for `limit` after a frame was handed over.
pub(crate) struct Paced {
    shared: Arc<Mutex<Leash>>,
    limit: Duration,
    /// Dropped with the answer, which ends the watchdog at once.
    _done: oneshot::Sender<()>,
}

struct Leash {
    body: Option<ProxyBody>,
    /// When the last frame went to hyper, while hyper has not asked for the next one: the
    /// client's turn. `None` while the body is the one waiting (the instance's turn, which
    /// `Idle` bounds) or before the first frame.
    handed: Option<Instant>,
}

impl Paced {
    pub(crate) fn wrap(body: ProxyBody, limit: Duration) -> ProxyBody {
        let shared = Arc::new(Mutex::new(Leash {
            body: Some(body),
            handed: None,
        }));
        let (done, stopped) = oneshot::channel();
        tokio::spawn(watch(shared.clone(), limit, stopped));
        Paced {
            shared,
            limit,
            _done: done,
        }
        .boxed()
    }
}

fn lock(shared: &Mutex<Leash>) -> std::sync::MutexGuard<'_, Leash> {
    // A panic while holding it leaves nothing half-done that matters here.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn watch(shared: Arc<Mutex<Leash>>, limit: Duration, mut stopped: oneshot::Receiver<()>) {
    loop {
        let next = lock(&shared).handed.map_or(Instant::now(), |at| at) + limit;
        tokio::select! {
            _ = &mut stopped => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        let mut leash = lock(&shared);
        if leash.handed.is_some_and(|at| at.elapsed() >= limit) {
            let body = leash.body.take();
            drop(leash);
            tracing::debug!(
                ?limit,
                "an HTTP/2 client took no data of its answer; the instance's side is closed"
            );
            drop(body);
            return;
        }
    }
}

impl Body for Paced {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut guard = lock(&self.shared);
        let leash = &mut *guard;
        let Some(body) = leash.body.as_mut() else {
            let limit = self.limit;
            return Poll::Ready(Some(Err(format!(
                "the client took no data for {limit:?}: the answer is cut off"
            )
            .into())));
        };
        leash.handed = None;
        let frame = ready!(Pin::new(body).poll_frame(cx));
        if frame.is_some() {
            leash.handed = Some(Instant::now());
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        lock(&self.shared)
            .body
            .as_ref()
            .is_some_and(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        lock(&self.shared)
            .body
            .as_ref()
            .map_or_else(SizeHint::default, Body::size_hint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn a_write_that_makes_no_progress_fails_after_the_limit() {
        // The reader never reads: once the pipe's buffer is full, writes wait.
        let (writer, _reader) = tokio::io::duplex(1024);
        let mut stalled = Stall::new(writer, Duration::from_secs(3));
        let started = Instant::now();
        let chunk = vec![0u8; 4096];
        let error = loop {
            match stalled.write(&chunk).await {
                Ok(_) => continue,
                Err(error) => break error,
            }
        };
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_taking_data_is_not_cut_off() {
        let (writer, mut reader) = tokio::io::duplex(1024);
        let mut paced = Stall::new(writer, Duration::from_secs(3));
        let reading = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let mut total = 0;
            // 2 s between reads: slow, but within the limit each time.
            while total < 8192 {
                tokio::time::sleep(Duration::from_secs(2)).await;
                total += tokio::io::AsyncReadExt::read(&mut reader, &mut buf)
                    .await
                    .unwrap_or(0);
            }
            total
        });
        let written = paced.write_all(&[1u8; 8192]).await;
        assert!(
            written.is_ok(),
            "a reader that reads every 2 s was cut off: {written:?}"
        );
        assert!(reading.await.is_ok_and(|n| n >= 8192));
    }

    fn endless() -> ProxyBody {
        let frames = std::iter::repeat_with(|| Ok(Frame::data(Bytes::from_static(b"x"))));
        StreamBody::new(tokio_stream::iter(frames)).boxed()
    }

    /// Tells when the body it wraps is dropped.
    struct Dropped(ProxyBody, Option<oneshot::Sender<()>>);

    impl Body for Dropped {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Pin::new(&mut self.0).poll_frame(cx)
        }
    }

    impl Drop for Dropped {
        fn drop(&mut self) {
            if let Some(told) = self.1.take() {
                let _ = told.send(());
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_no_one_asks_more_of_is_dropped_after_the_limit() {
        let (told, dropped) = oneshot::channel();
        let inner = Dropped(endless(), Some(told)).boxed();
        let mut paced = Paced::wrap(inner, Duration::from_secs(5));
        // One frame taken, then nothing, as when a client grants no more window.
        assert!(paced.frame().await.is_some_and(|f| f.is_ok()));
        let started = Instant::now();
        assert!(
            dropped.await.is_ok(),
            "the instance's side was never dropped"
        );
        assert!(started.elapsed() >= Duration::from_secs(5));
        let after = paced.frame().await;
        assert!(
            after.is_some_and(|f| f.is_err()),
            "a cut-off answer must end in an error"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_taken_slowly_but_steadily_is_kept() {
        let (told, mut dropped) = oneshot::channel();
        let inner = Dropped(endless(), Some(told)).boxed();
        let mut paced = Paced::wrap(inner, Duration::from_secs(5));
        for _ in 0..10 {
            assert!(paced.frame().await.is_some_and(|f| f.is_ok()));
            tokio::time::sleep(Duration::from_secs(4)).await;
        }
        assert!(
            dropped.try_recv().is_err(),
            "dropped while the client kept taking data"
        );
        drop(paced);
        // The watchdog ends with the answer rather than sleeping on.
        tokio::task::yield_now().await;
    }
}
