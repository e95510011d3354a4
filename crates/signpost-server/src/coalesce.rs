//! A registry connection's writes, gathered so that a change pushed to many streams of one
//! connection leaves in a few large writes rather than one system call per stream.
//!
//! h2 copies a small DATA frame into its own buffer, but a payload of 256 bytes or more it
//! sends as it is, and it writes each such frame out (one `writev`) before it takes the next:
//! an xDS push of a service's endpoint set to 250 streams of a connection was 250 system calls,
//! each also running the receiver's side of loopback TCP, most of the server's kernel time.
//!
//! [`Coalesced`] keeps what h2 writes and decides when it goes out. The connection task's
//! first flush in a turn writes at once, so a lone answer leaves as soon as it would have
//! without this; a further flush in the same turn that holds a large frame (h2 emptying its
//! buffer between large frames) is put off, the task woken, and what was kept goes out with
//! whatever else is written before the task's next turn, in one write. Less than a large frame
//! (the trailers that end an answer) is written at once. A turn starts with the connection
//! reading, which h2 does each time it is polled before it writes stream data. What is kept
//! is bounded ([`HOLD`]), a deferral is bounded in count, and a socket that pushes back is
//! written to at every flush, so nothing waits on anything but the task's next turn.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// Kept bytes beyond this are written at once.
const HOLD: usize = 64 * 1024;

/// Room kept between bursts; more is given back once written.
const RETAIN: usize = 16 * 1024;

/// Less than this kept at a flush goes out at once: it is the end of an answer (its trailers),
/// which a caller waits for, not one of a run of large frames. h2 writes frames of this size
/// and more from their own buffers, one write each.
const LARGE: usize = 256;

/// Flushes put off in a row before one writes regardless: a bound should h2 ever flush
/// repeatedly without reading in between.
const MAX_DEFERRALS: u32 = 64;

/// An I/O object whose writes within one turn of its connection task leave together.
#[derive(Debug)]
pub(crate) struct Coalesced<T> {
    io: T,
    kept: Vec<u8>,
    /// How much of `kept` is already written.
    written: usize,
    /// Counts the reads: a new one marks a new turn of the connection task.
    turn: u64,
    /// The turn of the last flush that had bytes to write.
    flushed_in: Option<u64>,
    deferrals: u32,
    /// The last write to `io` was refused for now: flushes write rather than defer.
    blocked: bool,
}

impl<T> Coalesced<T> {
    pub(crate) fn new(io: T) -> Self {
        Coalesced {
            io,
            kept: Vec::new(),
            written: 0,
            turn: 0,
            flushed_in: None,
            deferrals: 0,
            blocked: false,
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesced<T> {
    /// Writes everything kept.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.kept.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.kept[self.written..]) {
                Poll::Pending => {
                    self.blocked = true;
                    return Poll::Pending;
                }
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            }
        }
        self.blocked = false;
        self.deferrals = 0;
        self.kept.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Gives back a burst's room once it is written: it is not kept for the connection's
    /// whole life. (Within a burst it is: emptied and refilled up to [`HOLD`] many times, the
    /// buffer grown from nothing each time cost more copying than the bytes themselves.)
    fn release(&mut self) {
        if self.kept.is_empty() && self.kept.capacity() > RETAIN {
            self.kept = Vec::new();
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.turn = this.turn.wrapping_add(1);
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if this.kept.len() - this.written + len > HOLD {
            ready!(this.drain(cx))?;
        }
        if len > HOLD {
            return Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        }
        if len >= LARGE && this.flushed_in == Some(this.turn) && this.kept.capacity() < HOLD {
            // A large frame after the turn's first flush is one that will be kept: a burst,
            // given room for all of it at once rather than grown by doubling (each step a copy
            // of everything kept so far). A lone answer stays in the room it needs.
            this.kept
                .reserve_exact(HOLD.saturating_sub(this.kept.len()).max(len));
        }
        for b in bufs {
            this.kept.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.written < this.kept.len() {
            let again = this.flushed_in == Some(this.turn);
            this.flushed_in = Some(this.turn);
            let large = this.kept.len() - this.written >= LARGE;
            if again && large && !this.blocked && this.deferrals < MAX_DEFERRALS {
                // Written on the task's next turn, with what else comes before it.
                this.deferrals += 1;
                cx.waker().wake_by_ref();
                return Poll::Ready(Ok(()));
            }
            ready!(this.drain(cx))?;
            // A turn's first flush ends what came before it. A later one that writes (less
            // than a large frame kept, a socket that pushed back, the deferral bound reached)
            // may be inside a burst, which keeps its room.
            if !again {
                this.release();
            }
        } else {
            // Nothing kept: whatever burst there was is over.
            this.release();
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        this.release();
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for Coalesced<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    /// A socket that records each write it takes, and refuses writes while `full`.
    #[derive(Default)]
    struct Socket {
        writes: Vec<Vec<u8>>,
        full: bool,
    }

    impl AsyncRead for Socket {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Socket {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            if this.full {
                return Poll::Pending;
            }
            this.writes.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A frame h2 would write from its own buffer.
    fn frame(b: u8) -> Vec<u8> {
        vec![b; LARGE]
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct Turns {
        io: Coalesced<Socket>,
        wakes: Arc<Wakes>,
        waker: Waker,
    }

    impl Turns {
        fn new() -> Self {
            let wakes = Arc::new(Wakes::default());
            Turns {
                io: Coalesced::new(Socket::default()),
                waker: Waker::from(wakes.clone()),
                wakes,
            }
        }
        /// A new turn of the connection task: it reads first.
        fn turn(&mut self) {
            let mut bytes = [0u8; 16];
            let mut buf = ReadBuf::new(&mut bytes);
            let mut cx = Context::from_waker(&self.waker);
            assert!(
                Pin::new(&mut self.io)
                    .poll_read(&mut cx, &mut buf)
                    .is_pending()
            );
        }
        fn write(&mut self, bytes: &[u8]) {
            let mut cx = Context::from_waker(&self.waker);
            let n = Pin::new(&mut self.io).poll_write(&mut cx, bytes);
            assert!(matches!(n, Poll::Ready(Ok(n)) if n == bytes.len()));
        }
        fn flush(&mut self) -> Poll<io::Result<()>> {
            let mut cx = Context::from_waker(&self.waker);
            Pin::new(&mut self.io).poll_flush(&mut cx)
        }
        fn writes(&self) -> Vec<Vec<u8>> {
            self.io.io.writes.clone()
        }
        fn wakes(&self) -> usize {
            self.wakes.0.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn a_lone_answer_leaves_at_its_flush() {
        let mut t = Turns::new();
        t.turn();
        t.write(b"answer");
        assert!(t.flush().is_ready());
        assert_eq!(t.writes(), vec![b"answer".to_vec()]);
        assert_eq!(t.wakes(), 0);
    }

    #[test]
    fn flushes_within_a_turn_leave_together_at_the_next_turn() {
        let mut t = Turns::new();
        t.turn();
        t.write(&frame(1));
        assert!(t.flush().is_ready());
        for b in 2..5 {
            t.write(&frame(b));
            assert!(matches!(t.flush(), Poll::Ready(Ok(()))));
        }
        // The first went out; the rest wait for the turn the task was woken for.
        assert_eq!(t.writes(), vec![frame(1)]);
        assert!(t.wakes() >= 1);
        t.turn();
        t.write(b"trailers");
        assert!(t.flush().is_ready());
        let rest = [frame(2), frame(3), frame(4), b"trailers".to_vec()].concat();
        assert_eq!(t.writes(), vec![frame(1), rest]);
    }

    #[test]
    fn the_end_of_an_answer_leaves_at_its_flush() {
        let mut t = Turns::new();
        t.turn();
        t.write(&frame(1));
        // A lone answer is not a burst: it takes the room it needs, not a hold's.
        assert!(t.io.kept.capacity() < HOLD);
        assert!(t.flush().is_ready());
        t.write(b"trailers");
        assert!(t.flush().is_ready());
        assert_eq!(t.writes(), vec![frame(1), b"trailers".to_vec()]);
        assert_eq!(t.wakes(), 0);
    }

    /// A turn that wrote `a` at its first flush and kept a large frame at its second.
    fn kept_a_frame() -> Turns {
        let mut t = Turns::new();
        t.turn();
        t.write(b"a");
        assert!(t.flush().is_ready());
        t.write(&frame(2));
        assert!(t.flush().is_ready());
        assert_eq!(t.writes(), vec![b"a".to_vec()]);
        t
    }

    #[test]
    fn a_woken_turn_with_nothing_new_writes_what_was_kept() {
        let mut t = kept_a_frame();
        t.turn();
        assert!(t.flush().is_ready());
        assert_eq!(t.writes(), vec![b"a".to_vec(), frame(2)]);
    }

    #[test]
    fn more_than_the_hold_goes_out_without_waiting() {
        let mut t = Turns::new();
        t.turn();
        t.write(b"a");
        assert!(t.flush().is_ready());
        let big = vec![7u8; HOLD / 2 + 1];
        t.write(&big);
        assert!(t.flush().is_ready());
        t.write(&big);
        let written: usize = t.writes().iter().map(Vec::len).sum();
        assert_eq!(
            written,
            1 + big.len(),
            "the first half went out to make room"
        );
    }

    #[test]
    fn a_burst_keeps_its_room_until_it_ends() {
        let mut t = Turns::new();
        t.turn();
        t.write(b"a");
        assert!(t.flush().is_ready());
        // A burst several times the hold, longer than the deferral bound: written in a few
        // large writes, all from room taken once.
        let frames = 3 * HOLD / LARGE;
        for b in 0..frames {
            t.write(&frame(b as u8));
            assert!(
                t.io.kept.capacity() >= HOLD,
                "the room was given back or never taken, within the burst"
            );
            assert!(t.flush().is_ready());
        }
        // The burst ends at the next turn's flush: everything goes, and so does the room.
        t.turn();
        assert!(t.flush().is_ready());
        let written: usize = t.writes().iter().map(Vec::len).sum();
        assert_eq!(written, 1 + frames * LARGE);
        assert!(t.io.kept.capacity() <= RETAIN);
    }

    #[test]
    fn a_full_socket_is_written_to_at_every_flush() {
        let mut t = Turns::new();
        t.turn();
        t.io.io.full = true;
        t.write(b"a");
        assert!(t.flush().is_pending());
        t.write(b"b");
        // Refused before: tried again rather than put off, so its wake-up is the socket's.
        let wakes = t.wakes();
        assert!(t.flush().is_pending());
        assert_eq!(t.wakes(), wakes);
        t.io.io.full = false;
        assert!(t.flush().is_ready());
        assert_eq!(t.writes(), vec![b"ab".to_vec()]);
    }

    #[test]
    fn shutdown_writes_what_was_kept() {
        let mut t = kept_a_frame();
        let mut cx = Context::from_waker(&t.waker);
        assert!(Pin::new(&mut t.io).poll_shutdown(&mut cx).is_ready());
        assert_eq!(t.writes(), vec![b"a".to_vec(), frame(2)]);
    }

    #[test]
    fn deferrals_are_bounded_without_a_read() {
        let mut t = kept_a_frame();
        for _ in 0..MAX_DEFERRALS {
            t.write(&frame(2));
            assert!(t.flush().is_ready());
        }
        assert_eq!(t.writes().len(), 2, "the bound wrote the kept bytes");
    }
}
