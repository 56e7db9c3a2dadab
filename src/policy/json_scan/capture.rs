//! The tokenizer's capture buffers ([`super::Tokenizer`]): the decoded text of a key, string or
//! number (escapes and surrogate pairs resolved), and the raw bytes of a value as written, each
//! bounded by the cap its [`super::Capture`] names.

use super::Text;

/// The text being captured: a key, a string or number value.
#[derive(Debug, Default)]
pub(super) struct TextBuf {
    pub(super) on: bool,
    cap: usize,
    bytes: Vec<u8>,
    too_long: bool,
    lone: bool,
    /// A high surrogate escape waiting for its low half.
    high: Option<u16>,
}

impl TextBuf {
    pub(super) fn start(&mut self, cap: usize) {
        self.on = true;
        self.cap = cap;
        self.bytes.clear();
        self.too_long = false;
        self.lone = false;
        self.high = None;
    }

    pub(super) fn push(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.high.take().is_some() {
            self.lone = true;
        }
        if self.too_long || self.bytes.len() + bytes.len() > self.cap {
            self.too_long = true;
        } else {
            self.bytes.extend_from_slice(bytes);
        }
    }

    pub(super) fn code_unit(&mut self, unit: u16) {
        match (self.high.take(), unit) {
            (Some(high), 0xDC00..=0xDFFF) => {
                let c = 0x10000 + ((u32::from(high) - 0xD800) << 10) + (u32::from(unit) - 0xDC00);
                self.push_char(c);
            }
            (Some(_), _) => self.lone = true,
            (None, 0xD800..=0xDBFF) => self.high = Some(unit),
            (None, 0xDC00..=0xDFFF) => self.lone = true,
            (None, _) => self.push_char(u32::from(unit)),
        }
    }

    fn push_char(&mut self, c: u32) {
        let mut utf8 = [0u8; 4];
        if let Some(ch) = char::from_u32(c) {
            self.push(ch.encode_utf8(&mut utf8).as_bytes());
        }
    }

    /// Ends the capture and returns what it holds.
    pub(super) fn take(&mut self) -> Text<'_> {
        self.on = false;
        if self.high.take().is_some() {
            self.lone = true;
        }
        if self.lone {
            Text::LoneSurrogate
        } else if self.too_long {
            Text::TooLong
        } else {
            Text::Whole(&self.bytes)
        }
    }
}

/// A value whose raw bytes are being kept.
#[derive(Debug, Default)]
pub(super) struct RawBuf {
    /// The depth at which the captured value is a member or element; `None` when idle.
    pub(super) depth: Option<usize>,
    pub(super) cap: usize,
    pub(super) bytes: Vec<u8>,
    pub(super) too_long: bool,
    /// Where the value's bytes start in the current chunk.
    pub(super) from: usize,
}

impl RawBuf {
    pub(super) fn append(&mut self, bytes: &[u8]) {
        if self.too_long || self.bytes.len() + bytes.len() > self.cap {
            self.too_long = true;
        } else {
            self.bytes.extend_from_slice(bytes);
        }
    }
}
