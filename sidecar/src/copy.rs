//! A bidirectional copy whose idle connections hold no buffer at all.
//!
//! `tokio::io::copy_bidirectional` allocates both buffers up front and keeps
//! them for the connection's life: 2 × 8 KiB for every idle connection. An
//! `async fn` copy keeps its buffers in the task, and each layer that awaits
//! it by value can hold another copy of that state.
//!
//! Here [`Bidirectional`] is a plain future. Each poll reads into a buffer
//! on the stack and writes straight on. Only bytes a writer could not take
//! yet move to the heap, into a buffer that is then read into directly while
//! data keeps coming, and freed as soon as the reader has nothing ready. An
//! idle connection holds its two streams and a few words of state.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most read in one go: four TLS records' plaintext, written on in one
/// go. With one record (16 KiB) per read, a 1 MiB download cost the sidecar
/// 1.37 CPU-s per GiB, with four 0.55: each send on loopback runs the
/// receiver's TCP path and wake-up on the sender's CPU, and four records
/// now leave in one `writev`. Larger reads (128 KiB) measured no better.
const BURST: usize = 64 * 1024;

/// The smallest buffer held for bytes a writer could not take yet; reads
/// go into it until the reader has nothing ready.
const MIN_HELD: usize = 16 * 1024;

/// Copies `a` → `b` and `b` → `a` until both directions reach end of file,
/// shutting down each writer after its reader's end; the first error ends
/// both.
pub struct Bidirectional<A, B> {
    a: A,
    b: B,
    a_to_b: Direction,
    b_to_a: Direction,
}

impl<A, B> Bidirectional<A, B>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    /// The copy between `a` and `b`; nothing moves until it is polled.
    pub fn new(a: A, b: B) -> Self {
        Self { a, b, a_to_b: Direction::default(), b_to_a: Direction::default() }
    }
}

impl<A, B> Future for Bidirectional<A, B>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut scratch = [MaybeUninit::<u8>::uninit(); BURST];
        let a_to_b = this.a_to_b.poll_copy(cx, &mut this.a, &mut this.b, &mut scratch)?;
        let b_to_a = this.b_to_a.poll_copy(cx, &mut this.b, &mut this.a, &mut scratch)?;
        if a_to_b.is_ready() && b_to_a.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

/// One direction's state between polls.
#[derive(Default)]
struct Direction {
    /// Bytes the writer has not taken yet (`held[start..end]`), or, while a
    /// burst lasts, the buffer reads go into.
    held: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    /// Written since the last flush.
    dirty: bool,
    /// The reader reached end of file.
    eof: bool,
    /// The writer was shut down after the reader's end.
    done: bool,
}

impl Direction {
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        scratch: &mut [MaybeUninit<u8>; BURST],
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            // Whatever is held goes first.
            if let Some(held) = &self.held {
                while self.start < self.end {
                    let n = ready!(Pin::new(&mut *w).poll_write(cx, &held[self.start..self.end]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.start += n;
                    self.dirty = true;
                }
                (self.start, self.end) = (0, 0);
            }
            if self.eof {
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                (self.done, self.held) = (true, None);
                return Poll::Ready(Ok(()));
            }
            // Read what is ready: into the burst buffer while one is held, else
            // onto the stack, written on at once.
            let read = match &mut self.held {
                Some(held) => {
                    let mut buf = ReadBuf::new(held);
                    Pin::new(&mut *r).poll_read(cx, &mut buf).map_ok(|()| buf.filled().len())
                }
                None => {
                    let mut buf = ReadBuf::uninit(scratch);
                    match Pin::new(&mut *r).poll_read(cx, &mut buf) {
                        Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                            self.write_from_stack(cx, w, buf.filled())?;
                            continue;
                        }
                        other => other.map_ok(|()| 0),
                    }
                }
            };
            match read {
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(n)) => self.end = n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing ready: flush what was written, and hold no buffer while waiting.
                    if self.dirty {
                        ready!(Pin::new(&mut *w).poll_flush(cx))?;
                        self.dirty = false;
                    }
                    self.held = None;
                    return Poll::Pending;
                }
            }
        }
    }

    /// Writes `bytes` read onto the stack; what the writer cannot take now
    /// is kept in a burst buffer for the next poll.
    fn write_from_stack<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut W,
        bytes: &[u8],
    ) -> io::Result<()> {
        let mut written = 0;
        while written < bytes.len() {
            match Pin::new(&mut *w).poll_write(cx, &bytes[written..]) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    written += n;
                    self.dirty = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => break,
            }
        }
        if written < bytes.len() {
            let mut held = vec![0u8; (bytes.len() - written).max(MIN_HELD)].into_boxed_slice();
            let rest = &bytes[written..];
            held[..rest.len()].copy_from_slice(rest);
            (self.start, self.end, self.held) = (0, rest.len(), Some(held));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bursts_and_small_messages_arrive_whole_both_ways_and_each_end_is_passed_on() {
        let (client, proxy_client_side) = tokio::io::duplex(64 * 1024);
        let (proxy_app_side, app) = tokio::io::duplex(64 * 1024);
        let proxy = tokio::spawn(Bidirectional::new(proxy_client_side, proxy_app_side));
        let upload: Vec<u8> = (0..3 * 1024 * 1024 + 17).map(|i| (i * 7 % 251) as u8).collect();
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let (mut app_read, mut app_write) = tokio::io::split(app);
        let sent = upload.clone();
        let uploader = tokio::spawn(async move {
            client_write.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            client_write.write_all(&sent).await.unwrap();
            client_write.shutdown().await.unwrap();
        });
        let replier = tokio::spawn(async move {
            for reply in [&b"small"[..], &[9u8; 40_000][..]] {
                app_write.write_all(reply).await.unwrap();
            }
            app_write.shutdown().await.unwrap();
        });
        let mut at_app = Vec::new();
        app_read.read_to_end(&mut at_app).await.unwrap();
        let mut at_client = Vec::new();
        client_read.read_to_end(&mut at_client).await.unwrap();
        uploader.await.unwrap();
        replier.await.unwrap();
        proxy.await.unwrap().unwrap();
        assert_eq!(&at_app[..18], b"GET / HTTP/1.1\r\n\r\n");
        assert!(at_app[18..] == upload[..], "the upload arrives whole and in order");
        assert_eq!(&at_client[..5], b"small");
        assert!(at_client[5..].iter().all(|b| *b == 9) && at_client.len() == 40_005);
    }

    #[tokio::test]
    async fn a_reset_on_one_side_ends_both_directions() {
        let (client, proxy_client_side) = tokio::io::duplex(1024);
        let (proxy_app_side, app) = tokio::io::duplex(1024);
        let proxy = tokio::spawn(Bidirectional::new(proxy_client_side, proxy_app_side));
        drop(app);
        let mut client = client;
        // The app is gone: writing towards it fails, and the proxy ends.
        let _ = client.write_all(&[1u8; 4096]).await;
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), proxy).await;
        assert!(ended.is_ok(), "the copy ended once the app side was gone");
    }
}
