//! The SSE half of usage reading: events read line by line, the usage event found and, when
//! keygate asked for it, removed. See the parent module for what is read and removed.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// At the start of a line.
    Start,
    /// A blank line ended by CR: the event ends after it, or after an LF that follows.
    BlankCr,
    /// In a field name; how many bytes of `data` it matched, [`NOT_DATA`] once it cannot.
    Name(u8),
    /// After `data:`: an optional space, then the value.
    DataStart,
    Data,
    /// A comment or a field other than `data`.
    Other,
}

const NOT_DATA: u8 = 5;

/// The event being read.
#[derive(Debug, Default)]
struct Event {
    started: bool,
    tokenizer: Tokenizer,
    fields: UsageFields,
    data_lines: u32,
    json_failed: bool,
    /// A line other than `data`.
    other_lines: bool,
    /// Known not to be the usage-only event.
    pass: bool,
}

impl Event {
    fn reset(&mut self) {
        self.started = false;
        self.tokenizer.reset();
        self.fields.reset();
        self.data_lines = 0;
        self.json_failed = false;
        self.other_lines = false;
        self.pass = false;
    }

    fn data_line(&mut self) {
        if self.data_lines > 0 {
            self.data(b"\n");
        }
        self.data_lines += 1;
    }

    fn data(&mut self, bytes: &[u8]) {
        if !self.json_failed && self.tokenizer.feed(bytes, &mut self.fields).is_err() {
            self.json_failed = true;
        }
    }

    fn cannot_be_usage_only(&self) -> bool {
        self.other_lines || self.json_failed || self.fields.has_choices()
    }

    /// The event's JSON, if its data was one whole object.
    fn complete(&self) -> bool {
        self.data_lines > 0 && !self.json_failed && self.tokenizer.finish().is_ok()
    }
}

/// The bytes of one pushed chunk that go on to the client.
enum Out {
    Empty,
    Slice(Range<usize>),
    Buf(BytesMut),
}

impl Out {
    fn slice(&mut self, chunk: &[u8], r: Range<usize>) {
        if r.is_empty() {
            return;
        }
        match self {
            Out::Empty => *self = Out::Slice(r),
            Out::Slice(prev) if prev.end == r.start => prev.end = r.end,
            Out::Slice(prev) => {
                let mut b = BytesMut::from(&chunk[prev.clone()]);
                b.extend_from_slice(&chunk[r]);
                *self = Out::Buf(b);
            }
            Out::Buf(b) => b.extend_from_slice(&chunk[r]),
        }
    }

    fn bytes(&mut self, chunk: &[u8], bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        match self {
            Out::Empty => *self = Out::Buf(BytesMut::from(bytes)),
            Out::Slice(prev) => {
                let mut b = BytesMut::from(&chunk[prev.clone()]);
                b.extend_from_slice(bytes);
                *self = Out::Buf(b);
            }
            Out::Buf(b) => b.extend_from_slice(bytes),
        }
    }

    fn into_bytes(self, chunk: &Bytes) -> Bytes {
        match self {
            Out::Empty => Bytes::new(),
            Out::Slice(r) => chunk.slice(r),
            Out::Buf(b) => b.freeze(),
        }
    }
}

/// Where one pushed chunk stands.
struct Cursor<'a> {
    chunk: &'a Bytes,
    out: Out,
    /// Start of the bytes that flow and are not yet in `out`.
    flow_from: usize,
    /// Start of the held event's bytes in this chunk.
    hold_from: usize,
}

/// The usage of an SSE response, read event by event, and optionally the usage-only event
/// removed. See the module documentation.
#[derive(Debug)]
pub struct SseUsage {
    strip: bool,
    line: Line,
    /// The last line ended with CR: an LF right after it belongs to that line end.
    after_cr: bool,
    event: Event,
    holding: bool,
    pub(super) held: BytesMut,
    usage: Option<Usage>,
    /// The `model` of the event that carried `usage`.
    model: Option<String>,
    stripped: u32,
    /// Complete events with a non-empty `choices`: the tokens streamed, one per event.
    choice_events: u64,
}

impl SseUsage {
    /// Reads the usage; passes every byte on unchanged.
    pub fn counting() -> Self {
        Self::new(false)
    }

    /// Reads the usage and removes the usage-only event keygate asked for.
    pub fn stripping() -> Self {
        Self::new(true)
    }

    fn new(strip: bool) -> Self {
        Self {
            strip,
            line: Line::Start,
            after_cr: false,
            event: Event::default(),
            holding: false,
            held: BytesMut::new(),
            usage: None,
            model: None,
            stripped: 0,
            choice_events: 0,
        }
    }

    /// The usage of the last complete event that carried a readable one. Streams with
    /// `continuous_usage_stats` carry a running total in every event; the last is the total.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Completion tokens streamed so far, estimated as one per event with a non-empty
    /// `choices` (vLLM and llama.cpp send one token per event): what a stream cut before its
    /// usage event is charged.
    pub fn streamed_tokens(&self) -> u64 {
        self.choice_events
    }

    /// The `model` of the event whose usage [`SseUsage::usage`] reports, if it named one.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// How many usage-only events were removed.
    pub fn stripped(&self) -> u32 {
        self.stripped
    }

    /// Reads `chunk` and returns the bytes to pass on now.
    pub fn push(&mut self, chunk: &Bytes) -> Bytes {
        let mut cx = Cursor {
            chunk,
            out: Out::Empty,
            flow_from: 0,
            hold_from: 0,
        };
        let len = chunk.len();
        let mut i = 0;
        while i < len {
            let b = chunk[i];
            match self.line {
                Line::BlankCr => {
                    self.line = Line::Start;
                    if b == b'\n' {
                        i += 1;
                    }
                    self.dispatch(&mut cx, i);
                    continue;
                }
                Line::Start => {
                    if self.after_cr && b == b'\n' {
                        self.after_cr = false;
                        i += 1;
                        continue;
                    }
                    self.after_cr = false;
                    match b {
                        b'\n' => {
                            i += 1;
                            self.dispatch(&mut cx, i);
                        }
                        b'\r' => {
                            i += 1;
                            self.line = Line::BlankCr;
                        }
                        _ => {
                            if !self.event.started {
                                self.begin_event(&mut cx, i);
                            }
                            self.line = Line::Name(0);
                        }
                    }
                    continue;
                }
                _ if b == b'\n' || b == b'\r' => {
                    match self.line {
                        Line::Name(4) | Line::DataStart => self.event.data_line(),
                        Line::Name(_) => self.event.other_lines = true,
                        _ => {}
                    }
                    self.after_cr = b == b'\r';
                    self.line = Line::Start;
                }
                Line::Name(n) => {
                    if b == b':' {
                        if n == 4 {
                            self.line = Line::DataStart;
                        } else {
                            self.event.other_lines = true;
                            self.line = Line::Other;
                        }
                    } else if n < 4 && b == b"data"[usize::from(n)] {
                        self.line = Line::Name(n + 1);
                    } else {
                        self.line = Line::Name(NOT_DATA);
                    }
                }
                Line::DataStart => {
                    self.event.data_line();
                    self.line = Line::Data;
                    if b != b' ' {
                        continue;
                    }
                }
                Line::Data => {
                    let end = chunk[i..]
                        .iter()
                        .position(|&c| c == b'\n' || c == b'\r')
                        .map_or(len, |n| i + n);
                    self.event.data(&chunk[i..end]);
                    i = end;
                    self.decide_early(&mut cx);
                    continue;
                }
                Line::Other => {
                    i = chunk[i..]
                        .iter()
                        .position(|&c| c == b'\n' || c == b'\r')
                        .map_or(len, |n| i + n);
                    continue;
                }
            }
            self.decide_early(&mut cx);
            i += 1;
        }
        if self.holding {
            let tail = &chunk[cx.hold_from..];
            if self.held.len() + tail.len() > EVENT_HOLD_CAP {
                self.event.pass = true;
                self.release(&mut cx);
            } else {
                self.held.extend_from_slice(tail);
                return cx.out.into_bytes(chunk);
            }
        }
        let rest = cx.flow_from..len;
        cx.out.slice(chunk, rest);
        cx.out.into_bytes(chunk)
    }

    /// The end of the stream: the bytes still held.
    pub fn finish(&mut self) -> Bytes {
        let empty = Bytes::new();
        let mut cx = Cursor {
            chunk: &empty,
            out: Out::Empty,
            flow_from: 0,
            hold_from: 0,
        };
        if self.line == Line::BlankCr {
            self.line = Line::Start;
            self.dispatch(&mut cx, 0);
        }
        if self.holding {
            self.release(&mut cx);
        }
        cx.out.into_bytes(&empty)
    }

    fn begin_event(&mut self, cx: &mut Cursor<'_>, at: usize) {
        self.event.started = true;
        if self.strip {
            self.holding = true;
            cx.out.slice(cx.chunk, cx.flow_from..at);
            cx.hold_from = at;
        }
    }

    fn decide_early(&mut self, cx: &mut Cursor<'_>) {
        if self.holding && !self.event.pass && self.event.cannot_be_usage_only() {
            self.event.pass = true;
            self.release(cx);
        }
    }

    /// Passes the held bytes on; the event's bytes in this chunk flow from where it started.
    fn release(&mut self, cx: &mut Cursor<'_>) {
        cx.out.bytes(cx.chunk, &self.held);
        self.held.clear();
        cx.flow_from = cx.hold_from;
        self.holding = false;
    }

    /// A blank line ended the event just before `end`.
    fn dispatch(&mut self, cx: &mut Cursor<'_>, end: usize) {
        if !self.event.started {
            return;
        }
        let complete = self.event.complete();
        if complete && self.event.fields.has_nonempty_choices() {
            self.choice_events += 1;
        }
        if complete {
            if let Some(u) = self.event.fields.usage() {
                self.usage = Some(u);
                match self.event.fields.model() {
                    Some(m) => {
                        let kept = self.model.get_or_insert_with(String::new);
                        kept.clear();
                        kept.push_str(m);
                    }
                    None => self.model = None,
                }
            }
        }
        if self.holding {
            if complete && !self.event.other_lines && self.event.fields.usage_only() {
                self.held.clear();
                self.holding = false;
                cx.flow_from = end;
                self.stripped += 1;
            } else {
                self.release(cx);
            }
        }
        self.event.reset();
    }
}
