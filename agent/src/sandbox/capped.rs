//! A stdout/stderr sink that keeps the first `cap` bytes and counts the rest.
//!
//! wasmtime-wasi's `MemoryOutputPipe` makes the guest fail when it is full. A plugin that
//! prints too much should instead lose the excess, and the result should say so.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use drover_protocol::job::Captured;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

#[derive(Debug, Default)]
struct Inner {
    kept: Vec<u8>,
    total: u64,
}

/// A capped, shared output buffer. Clones share the same buffer.
#[derive(Debug, Clone)]
pub struct CappedPipe {
    cap: usize,
    inner: Arc<Mutex<Inner>>,
}

impl CappedPipe {
    /// A pipe keeping at most `cap` bytes.
    pub fn new(cap: usize) -> CappedPipe {
        CappedPipe {
            cap,
            inner: Arc::default(),
        }
    }

    fn push(&self, buf: &[u8]) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.total = inner.total.saturating_add(buf.len() as u64);
        let room = self.cap.saturating_sub(inner.kept.len());
        let take = room.min(buf.len());
        inner.kept.extend_from_slice(&buf[..take]);
    }

    /// What was kept, how much was written, and whether anything was dropped.
    pub fn captured(&self) -> Captured {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Captured {
            text: String::from_utf8_lossy(&inner.kept).into_owned(),
            total_bytes: inner.total,
            truncated: inner.total > inner.kept.len() as u64,
        }
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CappedPipe {
    async fn ready(&mut self) {}
}

impl OutputStream for CappedPipe {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always accept: the excess is counted and dropped, never pushed back on the guest.
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for CappedPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for CappedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_bytes_and_counts_the_rest() {
        let p = CappedPipe::new(5);
        let mut w = p.clone();
        w.write(Bytes::from_static(b"hello world")).unwrap();
        w.write(Bytes::from_static(b"!")).unwrap();
        let c = p.captured();
        assert_eq!(c.text, "hello");
        assert_eq!(c.total_bytes, 12);
        assert!(c.truncated);

        let q = CappedPipe::new(64);
        q.push(b"ok");
        assert!(!q.captured().truncated);
    }
}
