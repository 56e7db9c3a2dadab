//! The tokenizer's state machine: one byte at a time (a run at a time inside strings), it
//! validates the document and tells a [`Handler`] about keys, scalars and containers.

use super::bytes::{hex, is_ws, plain_run, BOM};
use super::capture::{RawBuf, TextBuf};
use super::{Capture, Handler, Kind, Scalar, ScanError, Text, KEY_CAP, MAX_DEPTH};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing read yet: a byte order mark, whitespace or `{`.
    Start,
    /// Inside the byte order mark; the number of its bytes read.
    Bom(u8),
    /// After the byte order mark: whitespace or `{`.
    Top,
    /// After `{`: a key or `}`.
    FirstKey,
    /// After `,` in an object: a key.
    NextKey,
    /// After a key: `:`.
    Colon,
    /// After `:`, or `,` in an array: a value.
    Value,
    /// After `[`: a value or `]`.
    FirstValue,
    /// After a value: `,` or the container's closing bracket.
    AfterValue,
    /// Inside a string.
    Str,
    /// After a backslash in a string.
    Escape,
    /// Inside `\uXXXX`; hex digits read so far.
    Hex(u8),
    /// Inside a multi-byte UTF-8 sequence: continuation bytes still due.
    Utf8(u8),
    Num(Num),
    /// Inside `true`, `false` or `null`: the literal and how many of its bytes were read.
    Lit(Lit, u8),
    /// After the top-level object: whitespace only.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

impl Num {
    fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::ExpDigits)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lit {
    True,
    False,
    Null,
}

impl Lit {
    fn word(self) -> &'static [u8] {
        match self {
            Lit::True => b"true",
            Lit::False => b"false",
            Lit::Null => b"null",
        }
    }
}

/// The tokenizer's state between chunks. See the module documentation.
#[derive(Debug)]
pub(crate) struct Tokenizer {
    state: State,
    depth: usize,
    /// Bit `d - 1` is set when the container at depth `d` is an array.
    arrays: u128,
    in_key: bool,
    /// What the handler asked for the next value.
    next: Capture,
    text: TextBuf,
    raw: RawBuf,
    /// The `\uXXXX` escape read so far.
    unit: u16,
    /// Bounds for the next byte of a UTF-8 sequence (the first continuation byte is narrower
    /// after E0, ED, F0 and F4).
    utf8_lo: u8,
    utf8_hi: u8,
    error: Option<ScanError>,
}

impl Default for Tokenizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Tokenizer {
    pub(crate) fn new() -> Self {
        Self {
            state: State::Start,
            depth: 0,
            arrays: 0,
            in_key: false,
            next: Capture::Skip,
            text: TextBuf::default(),
            raw: RawBuf::default(),
            unit: 0,
            utf8_lo: 0,
            utf8_hi: 0,
            error: None,
        }
    }

    /// Ready for a new document; keeps the capture buffers' memory.
    pub(crate) fn reset(&mut self) {
        self.state = State::Start;
        self.depth = 0;
        self.arrays = 0;
        self.in_key = false;
        self.next = Capture::Skip;
        self.text.on = false;
        self.raw.depth = None;
        self.error = None;
    }

    /// Reads `chunk`. After an error every later call returns the same error.
    pub(crate) fn feed<H: Handler>(&mut self, chunk: &[u8], h: &mut H) -> Result<(), ScanError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let result = self.run(chunk, h);
        if let Err(e) = result {
            self.error = Some(e);
        }
        result
    }

    /// The end of the document: an error unless exactly one whole object was read.
    pub(crate) fn finish(&self) -> Result<(), ScanError> {
        match (self.error, self.state) {
            (Some(e), _) => Err(e),
            (None, State::End) => Ok(()),
            (None, _) => Err(ScanError::Incomplete),
        }
    }

    fn run<H: Handler>(&mut self, chunk: &[u8], h: &mut H) -> Result<(), ScanError> {
        let len = chunk.len();
        if self.raw.depth.is_some() {
            self.raw.from = 0;
        }
        let mut i = 0;
        while i < len {
            let b = chunk[i];
            match self.state {
                State::Str => {
                    let run = plain_run(&chunk[i..]);
                    if self.text.on {
                        self.text.push(&chunk[i..i + run]);
                    }
                    i += run;
                    if i == len {
                        break;
                    }
                    let b = chunk[i];
                    match b {
                        b'"' => self.end_string(h, chunk, i),
                        b'\\' => self.state = State::Escape,
                        0x00..=0x1F => return Err(ScanError::Syntax),
                        _ => {
                            let (need, lo, hi) = match b {
                                0xC2..=0xDF => (1, 0x80, 0xBF),
                                0xE0 => (2, 0xA0, 0xBF),
                                0xE1..=0xEC | 0xEE..=0xEF => (2, 0x80, 0xBF),
                                0xED => (2, 0x80, 0x9F),
                                0xF0 => (3, 0x90, 0xBF),
                                0xF1..=0xF3 => (3, 0x80, 0xBF),
                                0xF4 => (3, 0x80, 0x8F),
                                _ => return Err(ScanError::Utf8),
                            };
                            if self.text.on {
                                self.text.push(&[b]);
                            }
                            self.utf8_lo = lo;
                            self.utf8_hi = hi;
                            self.state = State::Utf8(need);
                        }
                    }
                    i += 1;
                    continue;
                }
                State::Utf8(need) => {
                    if b < self.utf8_lo || b > self.utf8_hi {
                        return Err(ScanError::Utf8);
                    }
                    if self.text.on {
                        self.text.push(&[b]);
                    }
                    self.utf8_lo = 0x80;
                    self.utf8_hi = 0xBF;
                    self.state = if need == 1 {
                        State::Str
                    } else {
                        State::Utf8(need - 1)
                    };
                }
                State::Escape => {
                    let decoded = match b {
                        b'"' | b'\\' | b'/' => b,
                        b'b' => 0x08,
                        b'f' => 0x0C,
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'u' => {
                            self.unit = 0;
                            self.state = State::Hex(0);
                            i += 1;
                            continue;
                        }
                        _ => return Err(ScanError::Syntax),
                    };
                    if self.text.on {
                        self.text.push(&[decoded]);
                    }
                    self.state = State::Str;
                }
                State::Hex(n) => {
                    let v = hex(b).ok_or(ScanError::Syntax)?;
                    self.unit = (self.unit << 4) | v;
                    if n == 3 {
                        if self.text.on {
                            self.text.code_unit(self.unit);
                        }
                        self.state = State::Str;
                    } else {
                        self.state = State::Hex(n + 1);
                    }
                }
                State::Num(num) => {
                    let next = match (num, b) {
                        (Num::Minus, b'0') => Some(Num::Zero),
                        (Num::Minus, b'1'..=b'9') => Some(Num::Int),
                        (Num::Int, b'0'..=b'9') => Some(Num::Int),
                        (Num::Zero | Num::Int, b'.') => Some(Num::Dot),
                        (Num::Dot | Num::Frac, b'0'..=b'9') => Some(Num::Frac),
                        (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Some(Num::Exp),
                        (Num::Exp, b'+' | b'-') => Some(Num::ExpSign),
                        (Num::Exp | Num::ExpSign | Num::ExpDigits, b'0'..=b'9') => {
                            Some(Num::ExpDigits)
                        }
                        _ => None,
                    };
                    match next {
                        Some(n) => {
                            if self.text.on {
                                self.text.push(&[b]);
                            }
                            self.state = State::Num(n);
                        }
                        None if num.complete() => {
                            // The byte after the number belongs to what follows it.
                            let depth = self.depth;
                            let value = Scalar::Number(self.text_or_skipped());
                            h.scalar(depth, value);
                            self.state = State::AfterValue;
                            self.value_ended(h, chunk, i);
                            continue;
                        }
                        None => return Err(ScanError::Syntax),
                    }
                }
                State::Lit(lit, n) => {
                    let word = lit.word();
                    if b != word[usize::from(n)] {
                        return Err(ScanError::Syntax);
                    }
                    if usize::from(n) + 1 == word.len() {
                        let value = match lit {
                            Lit::True => Scalar::Bool(true),
                            Lit::False => Scalar::Bool(false),
                            Lit::Null => Scalar::Null,
                        };
                        h.scalar(self.depth, value);
                        self.state = State::AfterValue;
                        self.value_ended(h, chunk, i + 1);
                    } else {
                        self.state = State::Lit(lit, n + 1);
                    }
                }
                _ if is_ws(b) => {
                    if matches!(self.state, State::Start | State::Bom(_)) {
                        if self.state != State::Start {
                            return Err(ScanError::Utf8);
                        }
                        self.state = State::Top;
                    }
                }
                State::Start | State::Bom(_) | State::Top => match (self.state, b) {
                    (State::Start, 0xEF) => self.state = State::Bom(1),
                    (State::Bom(n), _) => {
                        if b != BOM[usize::from(n)] {
                            return Err(ScanError::Utf8);
                        }
                        self.state = if n == 2 {
                            State::Top
                        } else {
                            State::Bom(n + 1)
                        };
                    }
                    (_, b'{') => self.open(h, Kind::Object, i)?,
                    (_, b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n') => {
                        return Err(ScanError::NotAnObject)
                    }
                    (_, 0x80..=0xFF) => return Err(ScanError::Utf8),
                    _ => return Err(ScanError::Syntax),
                },
                State::FirstKey | State::NextKey => match b {
                    b'"' => {
                        self.in_key = true;
                        self.text.start(KEY_CAP);
                        self.state = State::Str;
                    }
                    b'}' if self.state == State::FirstKey => {
                        self.close(h, Kind::Object, chunk, i)?
                    }
                    _ => return Err(ScanError::Syntax),
                },
                State::Colon => {
                    if b != b':' {
                        return Err(ScanError::Syntax);
                    }
                    self.state = State::Value;
                }
                State::Value | State::FirstValue => {
                    if b == b']' && self.state == State::FirstValue {
                        self.close(h, Kind::Array, chunk, i)?;
                    } else {
                        self.begin_value(h, b, i)?;
                    }
                }
                State::AfterValue => match b {
                    b',' => {
                        self.state = if self.in_array() {
                            State::Value
                        } else {
                            State::NextKey
                        };
                    }
                    b'}' => self.close(h, Kind::Object, chunk, i)?,
                    b']' => self.close(h, Kind::Array, chunk, i)?,
                    _ => return Err(ScanError::Syntax),
                },
                State::End => return Err(ScanError::Syntax),
            }
            i += 1;
        }
        if self.raw.depth.is_some() {
            let from = self.raw.from.min(len);
            self.raw.append(&chunk[from..]);
        }
        Ok(())
    }

    fn in_array(&self) -> bool {
        self.depth > 0 && self.arrays & (1 << (self.depth - 1)) != 0
    }

    fn text_or_skipped(&mut self) -> Text<'_> {
        if self.text.on {
            self.text.take()
        } else {
            Text::Skipped
        }
    }

    fn begin_value<H: Handler>(&mut self, h: &mut H, b: u8, i: usize) -> Result<(), ScanError> {
        let capture = std::mem::replace(&mut self.next, Capture::Skip);
        if let (Capture::Raw { cap }, None) = (capture, self.raw.depth) {
            self.raw.depth = Some(self.depth);
            self.raw.cap = cap;
            self.raw.bytes.clear();
            self.raw.too_long = false;
            self.raw.from = i;
        }
        let text_cap = match capture {
            Capture::Text { cap } => Some(cap),
            _ => None,
        };
        let start_text = |t: &mut TextBuf| {
            if let Some(cap) = text_cap {
                t.start(cap);
            }
        };
        match b {
            b'{' => self.open(h, Kind::Object, i)?,
            b'[' => self.open(h, Kind::Array, i)?,
            b'"' => {
                self.in_key = false;
                start_text(&mut self.text);
                self.state = State::Str;
            }
            b'-' | b'0'..=b'9' => {
                start_text(&mut self.text);
                if self.text.on {
                    self.text.push(&[b]);
                }
                self.state = State::Num(match b {
                    b'-' => Num::Minus,
                    b'0' => Num::Zero,
                    _ => Num::Int,
                });
            }
            b't' => self.state = State::Lit(Lit::True, 1),
            b'f' => self.state = State::Lit(Lit::False, 1),
            b'n' => self.state = State::Lit(Lit::Null, 1),
            0x80..=0xFF => return Err(ScanError::Utf8),
            _ => return Err(ScanError::Syntax),
        }
        Ok(())
    }

    fn open<H: Handler>(&mut self, h: &mut H, kind: Kind, i: usize) -> Result<(), ScanError> {
        if self.depth == MAX_DEPTH {
            return Err(ScanError::TooDeep);
        }
        let bit = 1u128 << self.depth;
        if kind == Kind::Array {
            self.arrays |= bit;
        } else {
            self.arrays &= !bit;
        }
        self.depth += 1;
        h.open(self.depth, kind, i);
        self.state = match kind {
            Kind::Object => State::FirstKey,
            Kind::Array => State::FirstValue,
        };
        Ok(())
    }

    fn close<H: Handler>(
        &mut self,
        h: &mut H,
        kind: Kind,
        chunk: &[u8],
        i: usize,
    ) -> Result<(), ScanError> {
        if (kind == Kind::Array) != self.in_array() {
            return Err(ScanError::Syntax);
        }
        h.close(self.depth, kind, i);
        self.depth -= 1;
        if self.depth == 0 {
            self.state = State::End;
        } else {
            self.state = State::AfterValue;
            self.value_ended(h, chunk, i + 1);
        }
        Ok(())
    }

    fn end_string<H: Handler>(&mut self, h: &mut H, chunk: &[u8], i: usize) {
        if self.in_key {
            self.in_key = false;
            let depth = self.depth;
            let key = self.text.take();
            self.next = h.key(depth, key);
            self.state = State::Colon;
        } else {
            let depth = self.depth;
            let value = Scalar::String(self.text_or_skipped());
            h.scalar(depth, value);
            self.state = State::AfterValue;
            self.value_ended(h, chunk, i + 1);
        }
    }

    /// A value ended just before `end` in this chunk: completes a raw capture of it.
    fn value_ended<H: Handler>(&mut self, h: &mut H, chunk: &[u8], end: usize) {
        if self.raw.depth == Some(self.depth) {
            let from = self.raw.from.min(end);
            self.raw.append(&chunk[from..end]);
            self.raw.depth = None;
            let raw = if self.raw.too_long {
                Text::TooLong
            } else {
                Text::Whole(&self.raw.bytes)
            };
            h.raw(self.depth, raw);
        }
    }
}
