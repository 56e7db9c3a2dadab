//! The request for token usage on a streamed completion: whether the client asked for the
//! usage chunk, and if not, the `stream_options` member to insert before the body's closing `}`.

use bytes::Bytes;

use super::request::{Flag, Inspected, Options};
use crate::policy::json_scan::{Capture, Handler, Kind, Scalar, Text, Tokenizer};

/// What to do about token usage for one request. See [`Inspected::usage_request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageRequest {
    /// Not streamed (`stream` absent, `null` or `false`): a JSON response carries its usage.
    NotStreamed,
    /// Streamed, and the client asked for the usage chunk itself: count it, pass it on.
    Asked,
    /// Streamed without the usage chunk: insert these bytes before the body's closing `}`
    /// ([`Held::release`](super::hold_back::Held::release)) and remove the usage-only event
    /// from the response.
    Insert(Bytes),
    /// `stream` or `include_usage` has a value origins read differently (`1`, `"yes"`), or
    /// `stream_options` is not an object or over [`OPTIONS_CAP`](super::OPTIONS_CAP): whether
    /// the response will carry usage cannot be known. A key whose tokens are limited should be
    /// refused.
    Ambiguous,
}

impl Inspected {
    /// Whether and how to ask the upstream for the usage of a streamed completion.
    pub fn usage_request(&self) -> UsageRequest {
        match self.stream {
            Flag::Absent | Flag::Null | Flag::False => return UsageRequest::NotStreamed,
            Flag::Other => return UsageRequest::Ambiguous,
            Flag::True => {}
        }
        let members: &[u8] = match &self.options {
            Options::Absent | Options::Null => b"",
            Options::TooLarge | Options::Other => return UsageRequest::Ambiguous,
            Options::Object(raw) => match include_usage(raw) {
                Flag::True => return UsageRequest::Asked,
                Flag::Other => return UsageRequest::Ambiguous,
                Flag::Absent | Flag::Null | Flag::False => {
                    let inner = &raw[1..raw.len() - 1];
                    if inner.iter().all(u8::is_ascii_whitespace) {
                        b""
                    } else {
                        inner
                    }
                }
            },
        };
        let mut insert = Vec::with_capacity(members.len() + 48);
        if self.members > 0 {
            insert.push(b',');
        }
        insert.extend_from_slice(b"\"stream_options\":{");
        if !members.is_empty() {
            insert.extend_from_slice(members);
            insert.push(b',');
        }
        insert.extend_from_slice(b"\"include_usage\":true}");
        UsageRequest::Insert(Bytes::from(insert))
    }
}

/// `include_usage` in a `stream_options` object (the last of duplicates).
fn include_usage(object: &[u8]) -> Flag {
    #[derive(Default)]
    struct Find {
        here: bool,
        flag: Flag,
    }
    impl Handler for Find {
        fn key(&mut self, depth: usize, key: Text<'_>) -> Capture {
            if depth == 1 {
                self.here = key == Text::Whole(b"include_usage");
            }
            Capture::Skip
        }
        fn scalar(&mut self, depth: usize, value: Scalar<'_>) {
            if depth == 1 && self.here {
                self.flag = Flag::of(value);
            }
        }
        fn open(&mut self, depth: usize, _kind: Kind, _at: usize) {
            if depth == 2 && self.here {
                self.flag = Flag::Other;
            }
        }
    }
    let mut find = Find::default();
    let mut t = Tokenizer::new();
    match t.feed(object, &mut find).and_then(|()| t.finish()) {
        Ok(()) => find.flag,
        Err(_) => Flag::Other,
    }
}
