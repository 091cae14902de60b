//! A bidirectional copy whose idle connections hold no heap buffer.
//!
//! `tokio::io::copy_bidirectional` allocates both buffers up front and keeps
//! them for the connection's life: 2 × 16 KiB for every idle connection.
//! Here a direction waits with a small inline buffer. A message that fits
//! is written from it; a larger burst borrows a full buffer, which is freed
//! as soon as the reader has nothing ready.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// What a waiting direction holds: a request or a small response fits.
const INLINE: usize = 1024;

/// Copies `a` → `b` and `b` → `a` until both directions reach end of file,
/// shutting down each writer after its reader's end; the first error ends
/// both. `burst` is the buffer a direction borrows while data keeps coming.
pub async fn bidirectional<A, B>(a: A, b: B, burst: usize) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    tokio::try_join!(one_way(&mut a_read, &mut b_write, burst), one_way(&mut b_read, &mut a_write, burst))?;
    Ok(())
}

/// Reads into `buf` if bytes are ready now; `None` when the read would wait.
async fn read_ready<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> io::Result<Option<usize>> {
    poll_fn(|cx| {
        let mut read = ReadBuf::new(buf);
        match Pin::new(&mut *r).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(Some(read.filled().len()))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            // Nothing was consumed, so dropping the read loses nothing.
            Poll::Pending => Poll::Ready(Ok(None)),
        }
    })
    .await
}

async fn one_way<R, W>(r: &mut R, w: &mut W, burst: usize) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut inline = [0u8; INLINE];
    loop {
        let n = r.read(&mut inline).await?;
        if n == 0 {
            return w.shutdown().await;
        }
        if n < INLINE {
            w.write_all(&inline[..n]).await?;
            w.flush().await?;
            continue;
        }
        let mut buf = vec![0u8; burst.max(INLINE)];
        buf[..n].copy_from_slice(&inline);
        let mut filled = n;
        let ended = loop {
            let mut ended = false;
            while filled < buf.len() {
                match read_ready(r, &mut buf[filled..]).await? {
                    Some(0) => {
                        ended = true;
                        break;
                    }
                    Some(k) => filled += k,
                    None => break,
                }
            }
            w.write_all(&buf[..filled]).await?;
            if ended {
                break true;
            }
            match read_ready(r, &mut buf).await? {
                Some(0) => break true,
                Some(k) => filled = k,
                None => break false,
            }
        };
        if ended {
            return w.shutdown().await;
        }
        // The burst is over: the buffer goes before the next wait.
        drop(buf);
        w.flush().await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bursts_and_small_messages_arrive_whole_both_ways_and_each_end_is_passed_on() {
        let (client, proxy_client_side) = tokio::io::duplex(64 * 1024);
        let (proxy_app_side, app) = tokio::io::duplex(64 * 1024);
        let proxy = tokio::spawn(bidirectional(proxy_client_side, proxy_app_side, 16 * 1024));
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
        let proxy = tokio::spawn(bidirectional(proxy_client_side, proxy_app_side, 16 * 1024));
        drop(app);
        let mut client = client;
        // The app is gone: writing towards it fails, and the proxy ends.
        let _ = client.write_all(&[1u8; 4096]).await;
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), proxy).await;
        assert!(ended.is_ok(), "the copy ended once the app side was gone");
    }
}
