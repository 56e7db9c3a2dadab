//! The request body as it goes to the upstream, keeping a copy of what it has given out
//! (up to [`REPLAY_LIMIT`]) so that a request lost with a reused upstream connection can be
//! sent once more on another.
//!
//! An upstream may close an idle keep-alive connection at the moment keygate sends on it
//! (llama-server closes after every stream, without `Connection: close`). The request then
//! fails before any byte of a response. The pool's look at an idle connection catches most
//! of these; the rest are resent, as Pingora does: only from a reused connection, only once,
//! and only a body whose declared length is within the limit (a body of unknown length goes
//! out as it comes, unkept).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use crate::error::ProxyError;
use crate::forward::body::RequestBody;

/// The largest body kept for a resend; a larger one is not resent. Chat and completion
/// requests are far below it.
pub(crate) const REPLAY_LIMIT: usize = 64 * 1024;

/// The body sent upstream: the client's body as it comes, or, when it may be resent, first
/// what a resend gives again and then the client's body, its frames kept on the tape; or,
/// resent, a body that had ended before the request first went out.
pub(crate) enum Outgoing {
    Direct(RequestBody),
    Taped {
        again: VecDeque<Bytes>,
        tape: Arc<Mutex<Tape>>,
    },
    Empty,
}

/// How a request's body is sent once more.
pub(crate) enum Replay {
    /// The body had ended before the request went out (a GET's, most often): nothing to keep.
    Empty,
    Taped(Arc<Mutex<Tape>>),
}

impl Replay {
    /// The body once more, from its start, unless it could not be kept.
    pub(crate) fn again(&self) -> Option<Outgoing> {
        match self {
            Self::Empty => Some(Outgoing::Empty),
            Self::Taped(tape) => Tape::replay(tape),
        }
    }
}

impl Outgoing {
    /// The client's body, and how to send it again: a body that has ended needs nothing
    /// kept, another is kept on a tape if its declared length is within [`REPLAY_LIMIT`].
    pub(crate) fn recording(body: RequestBody) -> (Self, Option<Replay>) {
        if http_body::Body::is_end_stream(&body) {
            return (Self::Direct(body), Some(Replay::Empty));
        }
        let declared = http_body::Body::size_hint(&body).exact();
        if declared.is_none_or(|len| len > REPLAY_LIMIT as u64) {
            return (Self::Direct(body), None);
        }
        let tape = Arc::new(Mutex::new(Tape {
            body,
            kept: Vec::new(),
            len: 0,
            ended: false,
            spoilt: false,
        }));
        let outgoing = Self::Taped {
            again: VecDeque::new(),
            tape: tape.clone(),
        };
        (outgoing, Some(Replay::Taped(tape)))
    }
}

/// The client's body and what of it has been given out. The tape, not the request, owns the
/// body, so a request that fails before its body was read to the end can still send the
/// rest.
pub(crate) struct Tape {
    body: RequestBody,
    kept: Vec<Bytes>,
    len: usize,
    ended: bool,
    /// Over the limit, or failed: never resent.
    spoilt: bool,
}

impl Tape {
    /// The body once more, from its start, unless it could not be kept.
    pub(crate) fn replay(tape: &Arc<Mutex<Tape>>) -> Option<Outgoing> {
        let locked = lock(tape);
        (!locked.spoilt).then(|| Outgoing::Taped {
            again: locked.kept.iter().cloned().collect(),
            tape: tape.clone(),
        })
    }

    fn keep(&mut self, data: &Bytes) {
        if self.spoilt {
            return;
        }
        self.len += data.len();
        if self.len > REPLAY_LIMIT {
            self.spoilt = true;
            self.kept = Vec::new();
        } else {
            self.kept.push(data.clone());
        }
    }
}

fn lock(tape: &Mutex<Tape>) -> std::sync::MutexGuard<'_, Tape> {
    tape.lock().unwrap_or_else(PoisonError::into_inner)
}

impl http_body::Body for Outgoing {
    type Data = Bytes;
    type Error = ProxyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ProxyError>>> {
        let (again, tape) = match self.get_mut() {
            Self::Direct(body) => return Pin::new(body).poll_frame(cx),
            Self::Taped { again, tape } => (again, tape),
            Self::Empty => return Poll::Ready(None),
        };
        if let Some(data) = again.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        let mut tape = lock(tape);
        if tape.ended {
            return Poll::Ready(None);
        }
        let frame = ready!(Pin::new(&mut tape.body).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    tape.keep(data);
                }
            }
            Some(Err(_)) => tape.spoilt = true,
            None => tape.ended = true,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Direct(body) => body.is_end_stream(),
            Self::Taped { again, tape } => {
                let tape = lock(tape);
                again.is_empty() && (tape.ended || tape.body.is_end_stream())
            }
            Self::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        let (again, tape) = match self {
            Self::Direct(body) => return body.size_hint(),
            Self::Taped { again, tape } => (again, lock(tape)),
            Self::Empty => return SizeHint::with_exact(0),
        };
        let again: u64 = again.iter().map(|b| b.len() as u64).sum();
        let rest = if tape.ended {
            SizeHint::with_exact(0)
        } else {
            tape.body.size_hint()
        };
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + again);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + again);
        }
        hint
    }
}
