//! Hold-back: a [`Scanner`] in front of the upstream. Every chunk goes on as soon as it is
//! scanned, except the top-level object's closing `}` and what follows it, held until the
//! decision.

use bytes::{Bytes, BytesMut};

use super::request::{Inspected, Scanner, Undecidable};

/// A [`Scanner`] in front of the upstream: passes each chunk on at once, except the tail the
/// decision must wait for.
#[derive(Debug)]
pub struct HoldBack {
    scanner: Scanner,
    held: BytesMut,
    failed: Option<Undecidable>,
}

impl HoldBack {
    pub fn new(scanner: Scanner) -> Self {
        Self {
            scanner,
            held: BytesMut::new(),
            failed: None,
        }
    }

    /// Scans `chunk` and returns what may go upstream now; the rest is held. On an error the
    /// whole chunk is held too, for a caller that forwards the body anyway (a key without
    /// `models`), and the caller stops pushing: [`HoldBack::finish`] then returns the error
    /// and every byte not passed on.
    pub fn push(&mut self, chunk: Bytes) -> Result<Bytes, Undecidable> {
        if let Some(e) = self.failed {
            self.held.extend_from_slice(&chunk);
            return Err(e);
        }
        let before = self.scanner.held_back();
        if let Err(e) = self.scanner.feed(&chunk) {
            self.failed = Some(e);
            self.held.extend_from_slice(&chunk);
            return Err(e);
        }
        let hold = (self.scanner.held_back() - before).min(chunk.len());
        let pass = chunk.len() - hold;
        self.held.extend_from_slice(&chunk[pass..]);
        Ok(chunk.slice(..pass))
    }

    /// The scan so far, e.g. for an early look at [`Scanner::model`].
    pub fn scanner(&self) -> &Scanner {
        &self.scanner
    }

    /// The end of the body: the decision, and every byte pushed but not yet passed on.
    pub fn finish(self) -> (Result<Inspected, Undecidable>, Held) {
        let held = Held(self.held.freeze());
        match self.failed {
            Some(e) => (Err(e), held),
            None => (self.scanner.finish(), held),
        }
    }
}

/// The bytes held back from the upstream until the decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held(Bytes);

impl Held {
    /// The bytes to send upstream once the body is allowed, with `insert` (from
    /// [`UsageRequest::Insert`](super::UsageRequest::Insert), or empty) placed before the
    /// closing `}` that a decided body's held bytes start with.
    pub fn release(self, insert: &[u8]) -> Bytes {
        if insert.is_empty() || self.0.first() != Some(&b'}') {
            return self.0;
        }
        let mut out = BytesMut::with_capacity(insert.len() + self.0.len());
        out.extend_from_slice(insert);
        out.extend_from_slice(&self.0);
        out.freeze()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
