//! Protocol choice on a cleartext connection: HTTP/2 with prior knowledge (h2c) starts with a
//! fixed 24-byte preface, anything else is HTTP/1.x. The bytes read to decide are replayed to
//! the chosen protocol through [`Rewind`].
//!
//! The caller bounds [`sniff`] with `header_read_timeout`, so a client that connects and sends
//! nothing (or a few bytes at a time) cannot hold a connection slot before hyper's own
//! header timer takes over.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http1,
    Http2,
}

/// The bytes read so far and what they say. Reads only until the bytes stop matching the
/// HTTP/2 preface, so an HTTP/1.1 request usually costs one read of its first bytes.
pub(crate) async fn sniff<IO: AsyncRead + Unpin>(io: &mut IO) -> io::Result<(Protocol, Vec<u8>)> {
    let mut buf = vec![0u8; H2_PREFACE.len()];
    let mut filled = 0;
    loop {
        let n = io.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
        if buf[..filled] != H2_PREFACE[..filled] {
            buf.truncate(filled);
            return Ok((Protocol::Http1, buf));
        }
        if filled == H2_PREFACE.len() {
            return Ok((Protocol::Http2, buf));
        }
    }
}

pin_project! {
    /// An I/O stream that first yields `prefix`, then reads from `io`. Writes go to `io`.
    ///
    /// The read that yields the prefix also takes what `io` has ready behind it: hyper's
    /// first read then holds the whole request head, as on any other connection. Yielded
    /// alone, the prefix made hyper read twice for the first head, and its second read
    /// doubled the connection's read buffer to 16 KiB for the connection's life.
    pub struct Rewind<IO> {
        prefix: Bytes,
        consumed: usize,
        failed: Option<io::Error>,
        #[pin]
        io: IO,
    }
}

impl<IO> Rewind<IO> {
    pub(crate) fn new(prefix: impl Into<Bytes>, io: IO) -> Self {
        Self {
            prefix: prefix.into(),
            consumed: 0,
            failed: None,
            io,
        }
    }

    /// Whether some of the prefix is still to be read.
    pub(crate) fn has_unread(&self) -> bool {
        self.consumed < self.prefix.len()
    }

    /// The prefix bytes not yet read, and the stream.
    pub(crate) fn into_parts(self) -> (Bytes, IO) {
        (self.prefix.slice(self.consumed..), self.io)
    }
}

impl<IO: AsyncRead> AsyncRead for Rewind<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Err(e));
        }
        let rest = &this.prefix[*this.consumed..];
        if rest.is_empty() {
            return this.io.poll_read(cx, buf);
        }
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        *this.consumed += n;
        if buf.remaining() > 0 {
            let mut behind = ReadBuf::new(buf.initialize_unfilled());
            match this.io.poll_read(cx, &mut behind) {
                Poll::Ready(Ok(())) => {
                    let filled = behind.filled().len();
                    buf.advance(filled);
                }
                // The prefix is this read's result; the error is the next one's.
                Poll::Ready(Err(e)) => *this.failed = Some(e),
                Poll::Pending => {}
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite> AsyncWrite for Rewind<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn http1_is_chosen_at_the_first_differing_byte_and_replayed() {
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET / HTTP/1.1\r\n")
            .await
            .unwrap();
        let (protocol, prefix) = sniff(&mut server).await.unwrap();
        assert_eq!(protocol, Protocol::Http1);
        let mut replay = Rewind::new(prefix, server);
        let mut head = [0u8; 16];
        replay.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"GET / HTTP/1.1\r\n");
    }

    /// hyper's first read gets the whole head, not the sniffed bytes alone.
    #[tokio::test]
    async fn the_read_that_replays_the_prefix_takes_the_bytes_behind_it() {
        let head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n";
        let (mut client, mut server) = tokio::io::duplex(256);
        tokio::io::AsyncWriteExt::write_all(&mut client, head)
            .await
            .unwrap();
        let (protocol, prefix) = sniff(&mut server).await.unwrap();
        assert_eq!(protocol, Protocol::Http1);
        assert!(prefix.len() < head.len());
        let mut replay = Rewind::new(prefix, server);
        let mut buf = [0u8; 256];
        let n = replay.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], head);
    }

    /// An I/O stream that is reset: its first read fails, later ones find its end, as a
    /// socket's do.
    struct Reset {
        reported: bool,
    }

    impl AsyncRead for Reset {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if std::mem::replace(&mut self.reported, true) {
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
    }

    #[tokio::test]
    async fn an_error_behind_the_prefix_comes_with_the_next_read() {
        let mut replay = Rewind::new(b"GET".to_vec(), Reset { reported: false });
        let mut buf = [0u8; 16];
        assert_eq!(replay.read(&mut buf).await.unwrap(), 3);
        let e = replay.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn h2_preface_in_pieces_is_http2() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let sniffing =
            tokio::spawn(async move { sniff(&mut server).await.map(|(p, b)| (p, b.len())) });
        for piece in H2_PREFACE.chunks(5) {
            tokio::io::AsyncWriteExt::write_all(&mut client, piece)
                .await
                .unwrap();
        }
        assert_eq!(sniffing.await.unwrap().unwrap(), (Protocol::Http2, 24));
    }

    #[tokio::test]
    async fn closed_before_any_byte_is_an_error() {
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        assert!(sniff(&mut server).await.is_err());
    }
}
