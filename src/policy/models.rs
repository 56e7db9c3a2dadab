//! Which model a request body names, read the way the origin will read it, in constant memory
//! while the body streams to the upstream; the key's `models` allow-list; the request for token
//! usage on streamed completions; and the filtered `GET /v1/models` list.
//!
//! # Reading `model` like the origin
//!
//! vLLM and SGLang (FastAPI/pydantic over Python's `json`) and llama.cpp (nlohmann::json) decode
//! the whole body, resolve `\u` escapes in keys and values, skip one leading UTF-8 byte order
//! mark, and keep the *last* of duplicate keys (a Python dict; nlohmann's `operator[]` in its
//! DOM parser assigns over an existing key, in `std::map` and in `ordered_map` alike). So the
//! [`Scanner`] validates the whole body as one JSON object ([`crate::policy::json_scan`]),
//! decodes every top-level key (`"mod\u0065l"` is `model`) and keeps the top-level `model`
//! string, decoded. Keys inside `messages` or inside strings are never top-level and are ignored.
//! The content type is not consulted: every body of a key with `models` is read as JSON.
//!
//! The model is *undecidable*, and the request is refused, when the body is not one valid JSON
//! object (including trailing data, `NaN`/`Infinity`, UTF-16 or UTF-32 text and nesting past
//! [`crate::policy::json_scan::MAX_DEPTH`]), has no top-level `model`, has a `model` that is not
//! a string, is longer than [`MODEL_CAP`] bytes, holds an unpaired surrogate escape, or occurs
//! twice. Duplicates are refused rather than resolved last-wins: every origin known today takes
//! the last, but a refusal cannot disagree with any origin.
//!
//! # Forward while scanning, hold back the end
//!
//! A decision is possible only at the end of the body, since a duplicate `model` may come last.
//! Bodies are still not buffered: every chunk goes upstream as soon as it is scanned, except the
//! top-level object's closing `}` and the whitespace after it ([`Scanner::held_back`],
//! [`HoldBack`]). The upstream therefore holds an incomplete body until keygate decides: with
//! `Content-Length` or chunked framing it waits for bytes that a refused request never sends
//! (keygate drops the upstream request instead), and an object without its closing brace is not
//! JSON to any parser, so no origin can act on it early. Whitespace after the object is capped
//! at [`MAX_TRAILING`] bytes, so what is held back stays small.
//!
//! A refusal can come early: a body that is not JSON fails at the first bad byte, and a model
//! outside the allow-list can be refused as soon as it has been read ([`Scanner::model`]), since
//! whatever follows either leaves it the model or makes the body undecidable.
//!
//! Memory per request: the tokenizer's state, the model name (at most [`MODEL_CAP`] bytes), the
//! client's `stream_options` (at most [`OPTIONS_CAP`] bytes) and the held-back tail (at most
//! [`MAX_TRAILING`] + 1 bytes): about 2 KiB whatever the body's size.
//!
//! # Matching
//!
//! The key's [`Models`] (from the config) match the decoded name byte for byte against exact names and `prefix*` patterns.
//! Origins compare names exactly (a dict or hash-map lookup of the served name or LoRA adapter),
//! so case folding or Unicode normalisation here could only make keygate accept a spelling the
//! origin resolves differently, or refuse one it accepts: `Qwen/Qwen3-0.6B` and
//! `qwen/qwen3-0.6b`, or a name in NFC and NFD form, are different names to the origin and to
//! keygate alike.
//!
//! # Multipart bodies
//!
//! `/v1/audio/transcriptions` and `/v1/audio/translations` take `model` as a multipart form
//! field. Reading it the way the origin does would mean reproducing python-multipart's parsing of
//! boundaries, part headers, quoting and duplicate fields (Starlette keeps the last); a
//! difference there is a way around the allow-list. So multipart bodies are not parsed: read as
//! JSON they are invalid, and a key with `models` is refused on those routes. A key that needs
//! them is given without a `models` list.
//!
//! # Usage on streamed requests
//!
//! A streamed completion reports its token usage only when asked with
//! `stream_options.include_usage`. [`Inspected::usage_request`] says what to add when the client
//! did not ask: one more top-level `stream_options` member, inserted before the held-back `}`,
//! holding the client's own members followed by `"include_usage":true`. Python's `json` and
//! nlohmann::json both keep the last duplicate key, so the added member replaces the client's
//! and its `include_usage` replaces a `false` among the client's members. The response then
//! carries a usage-only event, which [`crate::forward::usage`] removes before the client sees it.
//! The body grows by the insertion, known only at its end, so such a request goes upstream
//! without its `Content-Length`: chunked over HTTP/1.1, which uvicorn and cpp-httplib read.

use std::fmt;

use bytes::{Bytes, BytesMut};

use crate::config::models::Models;
use crate::policy::json_scan::{Capture, Handler, Kind, Scalar, ScanError, Text, Tokenizer};

/// The longest model name read, in bytes after decoding; a longer one is undecidable.
pub const MODEL_CAP: usize = 512;

/// The longest client `stream_options` value kept, in bytes as written.
pub const OPTIONS_CAP: usize = 1024;

/// The most whitespace accepted after the body's top-level object.
pub const MAX_TRAILING: usize = 1024;

/// The largest `GET /v1/models` response body that [`filter_model_list`] reads.
pub const MODEL_LIST_CAP: usize = 4 << 20;

/// Why the model of a request body cannot be decided with certainty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undecidable {
    /// The body is not one JSON object.
    Json(ScanError),
    /// More than [`MAX_TRAILING`] bytes of whitespace after the object.
    TrailingWhitespace,
    /// No top-level `model`.
    MissingModel,
    /// A top-level `model` that is not a string.
    ModelNotString,
    /// A model name longer than [`MODEL_CAP`] bytes.
    ModelTooLong,
    /// A model name with an unpaired surrogate escape: no origin can match it.
    ModelLoneSurrogate,
    /// Two top-level `model` keys, however spelled.
    DuplicateModel,
}

impl Undecidable {
    /// A short, stable reason for logs.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Json(e) => e.reason(),
            Self::TrailingWhitespace => "trailing_whitespace",
            Self::MissingModel => "missing_model",
            Self::ModelNotString => "model_not_string",
            Self::ModelTooLong => "model_too_long",
            Self::ModelLoneSurrogate => "model_lone_surrogate",
            Self::DuplicateModel => "duplicate_model",
        }
    }
}

impl fmt::Display for Undecidable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

/// A top-level boolean member as the body has it (the last of duplicates).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flag {
    #[default]
    Absent,
    Null,
    False,
    True,
    /// Any other value: pydantic would coerce `1` or `"yes"` to true where nlohmann::json
    /// falls back to the default, so origins disagree on it.
    Other,
}

impl Flag {
    fn of(value: Scalar<'_>) -> Self {
        match value {
            Scalar::Bool(true) => Flag::True,
            Scalar::Bool(false) => Flag::False,
            Scalar::Null => Flag::Null,
            _ => Flag::Other,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
enum Model {
    #[default]
    Absent,
    Name(String),
    NotString,
    TooLong,
    LoneSurrogate,
    Duplicate,
}

impl Model {
    fn problem(&self) -> Option<Undecidable> {
        match self {
            Model::Absent | Model::Name(_) => None,
            Model::NotString => Some(Undecidable::ModelNotString),
            Model::TooLong => Some(Undecidable::ModelTooLong),
            Model::LoneSurrogate => Some(Undecidable::ModelLoneSurrogate),
            Model::Duplicate => Some(Undecidable::DuplicateModel),
        }
    }
}

/// The client's top-level `stream_options` (the last of duplicates).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
enum Options {
    #[default]
    Absent,
    Null,
    /// An object, as written.
    Object(Vec<u8>),
    /// Longer than [`OPTIONS_CAP`].
    TooLarge,
    /// Not an object.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Member {
    #[default]
    Other,
    Model,
    Stream,
    StreamOptions,
}

/// What the scan keeps of the top-level members.
#[derive(Debug, Default)]
struct Fields {
    member: Member,
    members: usize,
    model: Model,
    stream: Flag,
    options: Options,
    /// Where the top-level object closed in the chunk being fed.
    closed_at: Option<usize>,
}

impl Handler for Fields {
    fn key(&mut self, depth: usize, key: Text<'_>) -> Capture {
        if depth != 1 {
            return Capture::Skip;
        }
        self.members += 1;
        self.member = match key {
            Text::Whole(b"model") => Member::Model,
            Text::Whole(b"stream") => Member::Stream,
            Text::Whole(b"stream_options") => Member::StreamOptions,
            _ => Member::Other,
        };
        match self.member {
            Member::Model => {
                // The first problem stays the reason, however the body is split.
                if let Model::Name(_) = self.model {
                    self.model = Model::Duplicate;
                }
                Capture::Text { cap: MODEL_CAP }
            }
            Member::StreamOptions => Capture::Raw { cap: OPTIONS_CAP },
            Member::Stream | Member::Other => Capture::Skip,
        }
    }

    fn scalar(&mut self, depth: usize, value: Scalar<'_>) {
        if depth != 1 {
            return;
        }
        match self.member {
            Member::Model if self.model == Model::Absent => {
                self.model = match value {
                    Scalar::String(Text::Whole(name)) => match std::str::from_utf8(name) {
                        Ok(name) => Model::Name(name.to_owned()),
                        Err(_) => Model::LoneSurrogate,
                    },
                    Scalar::String(Text::TooLong) => Model::TooLong,
                    Scalar::String(_) => Model::LoneSurrogate,
                    _ => Model::NotString,
                }
            }
            Member::Stream => self.stream = Flag::of(value),
            _ => {}
        }
    }

    fn open(&mut self, depth: usize, _kind: Kind, _at: usize) {
        if depth != 2 {
            return;
        }
        match self.member {
            Member::Model if self.model == Model::Absent => self.model = Model::NotString,
            Member::Stream => self.stream = Flag::Other,
            _ => {}
        }
    }

    fn close(&mut self, depth: usize, _kind: Kind, at: usize) {
        if depth == 1 {
            self.closed_at = Some(at);
        }
    }

    fn raw(&mut self, depth: usize, raw: Text<'_>) {
        if depth != 1 || self.member != Member::StreamOptions {
            return;
        }
        self.options = match raw {
            Text::Whole(b"null") => Options::Null,
            Text::Whole(object) if object.first() == Some(&b'{') => {
                Options::Object(object.to_vec())
            }
            Text::TooLong => Options::TooLarge,
            _ => Options::Other,
        };
    }
}

/// Scans one request body, chunk by chunk. See the module documentation.
#[derive(Debug)]
pub struct Scanner {
    tokenizer: Tokenizer,
    fields: Fields,
    require_model: bool,
    /// Bytes fed so far.
    fed: u64,
    /// Where, counted from the body's start, the top-level object closed.
    closed_at: Option<u64>,
}

impl Scanner {
    /// For a key with `models`: every problem with the model refuses the body.
    pub fn requiring_model() -> Self {
        Self::new(true)
    }

    /// For a key without `models`: the body is read only for its `stream` and `stream_options`,
    /// and its model (if decidable) for the access log.
    pub fn without_model() -> Self {
        Self::new(false)
    }

    fn new(require_model: bool) -> Self {
        Self {
            tokenizer: Tokenizer::new(),
            fields: Fields::default(),
            require_model,
            fed: 0,
            closed_at: None,
        }
    }

    /// Reads the next chunk of the body. An error is final: the body cannot be decided.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), Undecidable> {
        self.fields.closed_at = None;
        let scanned = self.tokenizer.feed(chunk, &mut self.fields);
        if let Some(at) = self.fields.closed_at.take() {
            self.closed_at = Some(self.fed + at as u64);
        }
        self.fed += chunk.len() as u64;
        scanned.map_err(Undecidable::Json)?;
        if self.require_model {
            if let Some(problem) = self.fields.model.problem() {
                return Err(problem);
            }
        }
        if self.held_back() > MAX_TRAILING + 1 {
            return Err(Undecidable::TrailingWhitespace);
        }
        Ok(())
    }

    /// How many of the last bytes fed must not reach the upstream before the decision: the
    /// top-level object's closing `}` and everything after it; 0 before it arrives.
    pub fn held_back(&self) -> usize {
        self.closed_at
            .map_or(0, |at| usize::try_from(self.fed - at).unwrap_or(usize::MAX))
    }

    /// The model read so far. If the allow-list refuses it, the body can be refused now: the
    /// rest can only leave it the model or make the body undecidable.
    pub fn model(&self) -> Option<&str> {
        match &self.fields.model {
            Model::Name(name) => Some(name),
            _ => None,
        }
    }

    /// The end of the body: the decision.
    pub fn finish(self) -> Result<Inspected, Undecidable> {
        self.tokenizer.finish().map_err(Undecidable::Json)?;
        let model = match self.fields.model {
            Model::Name(name) => Some(name),
            Model::Absent if self.require_model => return Err(Undecidable::MissingModel),
            other => match other.problem() {
                Some(problem) if self.require_model => return Err(problem),
                _ => None,
            },
        };
        Ok(Inspected {
            model,
            stream: self.fields.stream,
            options: self.fields.options,
            members: self.fields.members,
        })
    }
}

/// A fully read request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspected {
    /// The decoded model; always `Some` for [`Scanner::requiring_model`].
    pub model: Option<String>,
    /// The top-level `stream`.
    pub stream: Flag,
    options: Options,
    members: usize,
}

/// What to do about token usage for one request. See [`Inspected::usage_request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageRequest {
    /// Not streamed (`stream` absent, `null` or `false`): a JSON response carries its usage.
    NotStreamed,
    /// Streamed, and the client asked for the usage chunk itself: count it, pass it on.
    Asked,
    /// Streamed without the usage chunk: insert these bytes before the body's closing `}`
    /// ([`Held::release`]) and remove the usage-only event from the response.
    Insert(Bytes),
    /// `stream` or `include_usage` has a value origins read differently (`1`, `"yes"`), or
    /// `stream_options` is not an object or over [`OPTIONS_CAP`]: whether the response will
    /// carry usage cannot be known. A key whose tokens are limited should be refused.
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
    /// [`UsageRequest::Insert`], or empty) placed before the closing `}` that a decided body's
    /// held bytes start with.
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

/// Why a `GET /v1/models` response cannot be filtered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListError {
    /// Over [`MODEL_LIST_CAP`].
    TooLarge,
    /// Not one JSON object.
    Json(ScanError),
    /// No top-level `data` array.
    NotAList,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum ListMember {
    #[default]
    Other,
    /// OpenAI's list.
    Data,
    /// llama.cpp's Ollama-style copy of it.
    Models,
}

#[derive(Debug)]
struct Entry {
    start: usize,
    end: usize,
    keep: bool,
}

#[derive(Debug)]
struct List {
    open: usize,
    close: usize,
    entries: Vec<Entry>,
}

/// Finds the entries of the top-level lists and judges each by its names.
struct ListScan<'m> {
    models: &'m Models,
    member: ListMember,
    has_data: bool,
    /// Inside a list's array.
    in_list: bool,
    lists: Vec<List>,
    /// The entry being read: where it started, whether it named a model, whether every
    /// name is allowed.
    entry: Option<(usize, bool, bool)>,
    /// The entry's key being read names the model.
    naming: bool,
}

impl Handler for ListScan<'_> {
    fn key(&mut self, depth: usize, key: Text<'_>) -> Capture {
        match depth {
            1 => {
                self.member = match key {
                    Text::Whole(b"data") => ListMember::Data,
                    Text::Whole(b"models") => ListMember::Models,
                    _ => ListMember::Other,
                };
                Capture::Skip
            }
            3 if self.entry.is_some() => {
                self.naming = matches!(key, Text::Whole(b"id" | b"name" | b"model"));
                if self.naming {
                    Capture::Text { cap: MODEL_CAP }
                } else {
                    Capture::Skip
                }
            }
            _ => Capture::Skip,
        }
    }

    fn scalar(&mut self, depth: usize, value: Scalar<'_>) {
        if depth != 3 || !self.naming {
            return;
        }
        if let Some((_, named, allowed)) = &mut self.entry {
            *named = true;
            let ok = match value {
                Scalar::String(Text::Whole(name)) => {
                    std::str::from_utf8(name).is_ok_and(|n| self.models.allows(n))
                }
                _ => false,
            };
            *allowed &= ok;
        }
    }

    fn open(&mut self, depth: usize, kind: Kind, at: usize) {
        match depth {
            2 if self.member != ListMember::Other && kind == Kind::Array => {
                self.has_data |= self.member == ListMember::Data;
                self.in_list = true;
                self.lists.push(List {
                    open: at,
                    close: at,
                    entries: Vec::new(),
                });
            }
            3 if kind == Kind::Object && self.in_list => self.entry = Some((at, false, true)),
            4 if self.naming => {
                if let Some((_, named, allowed)) = &mut self.entry {
                    *named = true;
                    *allowed = false;
                }
                self.naming = false;
            }
            _ => {}
        }
    }

    fn close(&mut self, depth: usize, _kind: Kind, at: usize) {
        match depth {
            2 if self.in_list => {
                if let Some(list) = self.lists.last_mut() {
                    list.close = at;
                }
                self.in_list = false;
            }
            3 => {
                if let (Some((start, named, allowed)), Some(list)) =
                    (self.entry.take(), self.lists.last_mut())
                {
                    list.entries.push(Entry {
                        start,
                        end: at + 1,
                        keep: named && allowed,
                    });
                }
            }
            _ => {}
        }
    }
}

/// The origin's `GET /v1/models` body with only the entries `models` allows: in the top-level
/// `data` list (entries named by `id`) and, from llama.cpp, the `models` list (named by `name`
/// and `model`). An entry is kept when it names a model and every name it gives is allowed;
/// entries that are not objects are dropped. Everything else stays as the origin wrote it.
pub fn filter_model_list(body: &[u8], models: &Models) -> Result<Vec<u8>, ListError> {
    if body.len() > MODEL_LIST_CAP {
        return Err(ListError::TooLarge);
    }
    let mut scan = ListScan {
        models,
        member: ListMember::Other,
        has_data: false,
        in_list: false,
        lists: Vec::new(),
        entry: None,
        naming: false,
    };
    let mut t = Tokenizer::new();
    t.feed(body, &mut scan).map_err(ListError::Json)?;
    t.finish().map_err(ListError::Json)?;
    if !scan.has_data {
        return Err(ListError::NotAList);
    }
    let mut out = Vec::with_capacity(body.len());
    let mut from = 0;
    for list in &scan.lists {
        out.extend_from_slice(&body[from..=list.open]);
        let mut first = true;
        for e in list.entries.iter().filter(|e| e.keep) {
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(&body[e.start..e.end]);
        }
        from = list.close;
    }
    out.extend_from_slice(&body[from..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::json_scan;
    use proptest::prelude::*;

    /// As the openai Python client sends a streamed chat completion.
    const OPENAI_CHAT: &str = r#"{"messages": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Say hello in three languages."}], "model": "Qwen/Qwen3-0.6B", "max_tokens": 64, "stream": true, "temperature": 0.7}"#;

    /// A vision request as vLLM's documentation shows it, with a tool whose schema has a
    /// property called `model`.
    const VLLM_VISION: &str = r#"{
  "model": "lora-vision",
  "messages": [
    {"role": "user", "content": [
      {"type": "text", "text": "What is in this image? Answer as {\"model\": \"x\"}."},
      {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="}}
    ]}
  ],
  "tools": [{"type": "function", "function": {"name": "pick", "parameters": {"type": "object", "properties": {"model": {"type": "string"}}}}}],
  "max_tokens": 300
}
"#;

    /// llama.cpp's own completion endpoint, as its README shows it.
    const LLAMACPP_COMPLETION: &str = r#"{"prompt":"Building a website can be done in 10 simple steps:","n_predict":128,"model":"Qwen/Qwen3-0.6B","stream":false}"#;

    fn scan_chunks(chunks: &[&[u8]], require: bool) -> Result<Inspected, Undecidable> {
        let mut s = if require {
            Scanner::requiring_model()
        } else {
            Scanner::without_model()
        };
        for c in chunks {
            s.feed(c)?;
        }
        s.finish()
    }

    fn scan(body: &[u8]) -> Result<Inspected, Undecidable> {
        scan_chunks(&[body], true)
    }

    fn model(body: &[u8]) -> Result<String, Undecidable> {
        scan(body).map(|i| i.model.unwrap_or_default())
    }

    /// The decision for `body`, checked to be the same for every split in two and for every
    /// byte on its own, through the [`HoldBack`] as well.
    fn decide(body: &[u8]) -> Result<String, Undecidable> {
        let whole = model(body);
        for cut in 0..=body.len() {
            let (a, b) = body.split_at(cut);
            assert_eq!(
                scan_chunks(&[a, b], true).map(|i| i.model.unwrap_or_default()),
                whole,
                "split at {cut}"
            );
            assert_eq!(hold_back(&[a, b]).0, whole, "held, split at {cut}");
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(
            scan_chunks(&bytes, true).map(|i| i.model.unwrap_or_default()),
            whole
        );
        whole
    }

    /// Runs chunks through a [`HoldBack`]: the decision, the bytes passed on before it, and
    /// the held bytes released after it.
    fn hold_back(chunks: &[&[u8]]) -> (Result<String, Undecidable>, Vec<u8>, Vec<u8>) {
        let mut h = HoldBack::new(Scanner::requiring_model());
        let mut passed = Vec::new();
        for c in chunks {
            if let Ok(b) = h.push(Bytes::copy_from_slice(c)) {
                passed.extend_from_slice(&b);
            }
        }
        let (decision, held) = h.finish();
        let decision = decision.map(|i| i.model.unwrap_or_default());
        (decision, passed, held.release(b"").to_vec())
    }

    #[test]
    fn real_bodies_name_their_model() {
        assert_eq!(decide(OPENAI_CHAT.as_bytes()), Ok("Qwen/Qwen3-0.6B".into()));
        assert_eq!(decide(VLLM_VISION.as_bytes()), Ok("lora-vision".into()));
        assert_eq!(
            decide(LLAMACPP_COMPLETION.as_bytes()),
            Ok("Qwen/Qwen3-0.6B".into())
        );
    }

    #[test]
    fn escapes_in_keys_and_values_are_decoded() {
        assert_eq!(decide(br#"{"mod\u0065l":"a"}"#), Ok("a".into()));
        assert_eq!(
            decide(br#"{"\u006d\u006F\u0064\u0065\u006c":"a"}"#),
            Ok("a".into())
        );
        assert_eq!(
            decide(br#"{"model":"Qwen\/Qwen3-0.6B"}"#),
            Ok("Qwen/Qwen3-0.6B".into())
        );
        assert_eq!(
            decide(br#"{"model":"lora-\u00e9\ud83d\ude00"}"#),
            Ok("lora-é😀".into())
        );
        assert_eq!(decide(br#"{"model":"a\u0000"}"#), Ok("a\0".into()));
        assert_eq!(
            decide(br#"{"model":"a\ud800"}"#),
            Err(Undecidable::ModelLoneSurrogate)
        );
        assert_eq!(
            decide(br#"{"model":"\udc00a"}"#),
            Err(Undecidable::ModelLoneSurrogate)
        );
        // Not the key `model`: a different name to every origin.
        assert_eq!(decide(br#"{"Model":"a"}"#), Err(Undecidable::MissingModel));
        assert_eq!(decide(br#"{"model ":"a"}"#), Err(Undecidable::MissingModel));
        assert_eq!(
            decide(br#"{"mod\u0000el":"a"}"#),
            Err(Undecidable::MissingModel)
        );
    }

    #[test]
    fn duplicate_models_are_refused_however_spelled() {
        for body in [
            &br#"{"model":"a","model":"b"}"#[..],
            br#"{"model":"a","model":"a"}"#,
            br#"{"model":"a","mod\u0065l":"b"}"#,
            br#"{"mod\u0065l":"b","model":"a"}"#,
            br#"{"model":"a","model":{"x":1}}"#,
            br#"{"model":"a","messages":[],"max_tokens":5,"model":"b"}"#,
        ] {
            assert_eq!(decide(body), Err(Undecidable::DuplicateModel), "{body:?}");
        }
        // The duplicate can come last, just before the closing brace: only then is it known.
        let mut s = Scanner::requiring_model();
        assert_eq!(s.feed(br#"{"model":"a","x":1,"#), Ok(()));
        assert_eq!(s.model(), Some("a"));
        assert_eq!(s.feed(br#""model":"#), Err(Undecidable::DuplicateModel));
    }

    #[test]
    fn models_elsewhere_than_the_top_level_are_ignored() {
        assert_eq!(
            decide(br#"{"messages":[{"role":"user","model":"x"}],"model":"a"}"#),
            Ok("a".into())
        );
        assert_eq!(
            decide(br#"{"messages":[{"role":"user","model":"x"}]}"#),
            Err(Undecidable::MissingModel)
        );
        assert_eq!(
            decide(br#"{"extra":{"model":"x","model":"y"},"model":"a"}"#),
            Ok("a".into())
        );
        assert_eq!(
            decide(br#"{"prompt":"\",\"model\":\"x","model":"a"}"#),
            Ok("a".into())
        );
        assert_eq!(
            decide(br#"{"prompt":"{\"model\":\"x\"}"}"#),
            Err(Undecidable::MissingModel)
        );
        assert_eq!(
            decide(br#"{"x":["model","y"],"model":"a"}"#),
            Ok("a".into())
        );
    }

    #[test]
    fn the_first_problem_is_the_reason_however_the_body_is_split() {
        assert_eq!(
            decide(br#"{"model":1,"model":"a"}"#),
            Err(Undecidable::ModelNotString)
        );
        assert_eq!(
            decide(br#"{"model":"a","model":1}"#),
            Err(Undecidable::DuplicateModel)
        );
    }

    #[test]
    fn a_model_that_is_not_a_string_is_undecidable() {
        for value in [
            "1",
            "null",
            "true",
            "false",
            "[\"a\"]",
            "{\"name\":\"a\"}",
            "-0.5",
        ] {
            let body = format!("{{\"model\":{value}}}");
            assert_eq!(
                decide(body.as_bytes()),
                Err(Undecidable::ModelNotString),
                "{body}"
            );
        }
    }

    #[test]
    fn invalid_bodies_are_undecidable() {
        for (body, e) in [
            (&b""[..], ScanError::Incomplete),
            (br#"{"model":"a""#, ScanError::Incomplete),
            (br#"{"model":"a"}x"#, ScanError::Syntax),
            (br#"{"model":"a"}{"model":"b"}"#, ScanError::Syntax),
            (br#"{"model":"a","t":NaN}"#, ScanError::Syntax),
            (br#"{"model":"a","t":Infinity}"#, ScanError::Syntax),
            (br#"[{"model":"a"}]"#, ScanError::NotAnObject),
            (br#""model""#, ScanError::NotAnObject),
            (b"model=a", ScanError::Syntax),
            (
                b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\na\r\n--b--\r\n",
                ScanError::NotAnObject,
            ),
            (
                b"\xef\xbb\xbf\xef\xbb\xbf{\"model\":\"a\"}",
                ScanError::Utf8,
            ),
            (b"\x1f\x8b\x08\x00\x00\x00\x00\x00", ScanError::Syntax),
        ] {
            assert_eq!(decide(body), Err(Undecidable::Json(e)), "{body:?}");
        }
    }

    #[test]
    fn one_byte_order_mark_is_read_like_python_reads_it() {
        assert_eq!(decide(b"\xef\xbb\xbf{\"model\":\"a\"}"), Ok("a".into()));
    }

    #[test]
    fn utf16_and_utf32_bodies_are_refused() {
        let text = r#"{"model":"a"}"#;
        let le16: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let be16: Vec<u8> = text.encode_utf16().flat_map(u16::to_be_bytes).collect();
        let le32: Vec<u8> = text
            .chars()
            .flat_map(|c| (c as u32).to_le_bytes())
            .collect();
        let be32: Vec<u8> = text
            .chars()
            .flat_map(|c| (c as u32).to_be_bytes())
            .collect();
        let mut bom16 = vec![0xFF, 0xFE];
        bom16.extend_from_slice(&le16);
        for body in [le16, be16, le32, be32, bom16] {
            assert!(
                matches!(decide(&body), Err(Undecidable::Json(_))),
                "{body:?}"
            );
        }
    }

    #[test]
    fn limits_hold() {
        let name = "m".repeat(MODEL_CAP);
        let body = format!("{{\"model\":\"{name}\"}}");
        assert_eq!(model(body.as_bytes()), Ok(name.clone()));
        let body = format!("{{\"model\":\"{name}x\"}}");
        assert_eq!(model(body.as_bytes()), Err(Undecidable::ModelTooLong));
        // The cap counts decoded bytes: escapes do not stretch it.
        let escaped = "\\u006d".repeat(MODEL_CAP);
        let body = format!("{{\"model\":\"{escaped}\"}}");
        assert_eq!(model(body.as_bytes()), Ok(name));

        let body = format!("{{\"model\":\"a\"}}{}", " ".repeat(MAX_TRAILING));
        assert_eq!(model(body.as_bytes()), Ok("a".into()));
        let body = format!("{{\"model\":\"a\"}}{}", "\n".repeat(MAX_TRAILING + 1));
        assert_eq!(model(body.as_bytes()), Err(Undecidable::TrailingWhitespace));

        let depth = json_scan::MAX_DEPTH;
        let nest = |n: usize| {
            format!(
                "{{\"model\":\"a\",\"x\":{}{}}}",
                "[".repeat(n - 1),
                "]".repeat(n - 1)
            )
        };
        assert_eq!(model(nest(depth).as_bytes()), Ok("a".into()));
        assert_eq!(
            model(nest(depth + 1).as_bytes()),
            Err(Undecidable::Json(ScanError::TooDeep))
        );
    }

    #[test]
    fn without_models_only_the_json_must_be_valid() {
        let i = scan_chunks(&[br#"{"prompt":"x","stream":true}"#], false).unwrap();
        assert_eq!(i.model, None);
        assert_eq!(i.stream, Flag::True);
        let i = scan_chunks(&[br#"{"model":"a","model":"b"}"#], false).unwrap();
        assert_eq!(i.model, None);
        let i = scan_chunks(&[br#"{"model":"a"}"#], false).unwrap();
        assert_eq!(i.model.as_deref(), Some("a"));
        assert!(scan_chunks(&[b"{"], false).is_err());
    }

    #[test]
    fn the_closing_brace_is_held_back_until_the_decision() {
        let body = format!("{OPENAI_CHAT}\n");
        let body = body.as_bytes();
        for cut in 0..=body.len() {
            let (a, b) = body.split_at(cut);
            let (decision, passed, held) = hold_back(&[a, b]);
            assert_eq!(decision, Ok("Qwen/Qwen3-0.6B".into()));
            assert_eq!(held, b"}\n", "split at {cut}");
            assert_eq!([passed, held].concat(), body);
        }
        // A refused body: what was passed on is never a complete document.
        let refused = br#"{"model":"a","x":1,"model":"b"}"#;
        for cut in 0..=refused.len() {
            let (a, b) = refused.split_at(cut);
            let (decision, passed, _) = hold_back(&[a, b]);
            assert_eq!(decision, Err(Undecidable::DuplicateModel));
            assert!(json_scan::validate(&passed).is_err());
        }
    }

    #[test]
    fn an_error_keeps_every_byte_for_a_caller_that_forwards_anyway() {
        let mut h = HoldBack::new(Scanner::without_model());
        assert_eq!(
            h.push(Bytes::from_static(b"{\"a\":")).unwrap(),
            &b"{\"a\":"[..]
        );
        assert!(h.push(Bytes::from_static(b"x}")).is_err());
        assert!(h.push(Bytes::from_static(b"rest")).is_err());
        let (decision, held) = h.finish();
        assert_eq!(decision, Err(Undecidable::Json(ScanError::Syntax)));
        assert_eq!(held.release(b""), &b"x}rest"[..]);
    }

    fn usage(body: &str) -> UsageRequest {
        scan_chunks(&[body.as_bytes()], false)
            .unwrap()
            .usage_request()
    }

    /// The body the upstream receives after the usage insertion.
    fn with_usage(body: &str) -> serde_json::Value {
        let UsageRequest::Insert(insert) = usage(body) else {
            panic!("no insertion for {body}");
        };
        let (decision, passed, held) = {
            let mut h = HoldBack::new(Scanner::without_model());
            let passed = h.push(Bytes::copy_from_slice(body.as_bytes())).unwrap();
            let (d, held) = h.finish();
            (d, passed, held)
        };
        assert!(decision.is_ok());
        let sent = [&passed[..], &held.release(&insert)[..]].concat();
        assert_eq!(json_scan::validate(&sent), Ok(()));
        serde_json::from_slice(&sent).unwrap()
    }

    #[test]
    fn streamed_requests_without_usage_get_it_asked_for() {
        let v = with_usage(OPENAI_CHAT);
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true})
        );
        assert_eq!(v["model"], "Qwen/Qwen3-0.6B");

        let v = with_usage(
            r#"{"model":"a","stream":true,"stream_options":{"continuous_usage_stats":true}} "#,
        );
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"continuous_usage_stats": true, "include_usage": true})
        );
        // The client's `false` is replaced: the last duplicate wins.
        let v =
            with_usage(r#"{"model":"a","stream":true,"stream_options":{"include_usage":false}}"#);
        assert_eq!(v["stream_options"]["include_usage"], true);
        let v = with_usage(r#"{"stream":true,"stream_options":null}"#);
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true})
        );
        let v = with_usage(r#"{"stream":true,"stream_options":{ }}"#);
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true})
        );
        assert_eq!(
            usage(r#"{"stream":true,"stream_options":{"include_usage":null}}"#),
            UsageRequest::Insert(Bytes::from_static(
                br#","stream_options":{"include_usage":null,"include_usage":true}"#
            ))
        );
    }

    #[test]
    fn usage_requests_follow_what_the_client_asked() {
        assert_eq!(usage(r#"{"model":"a"}"#), UsageRequest::NotStreamed);
        assert_eq!(usage(r#"{"stream":false}"#), UsageRequest::NotStreamed);
        assert_eq!(usage(r#"{"stream":null}"#), UsageRequest::NotStreamed);
        assert_eq!(
            usage(r#"{"stream":true,"stream":false}"#),
            UsageRequest::NotStreamed
        );
        assert_eq!(
            usage(r#"{"stream":true,"stream_options":{"include_usage":true}}"#),
            UsageRequest::Asked
        );
        assert_eq!(
            usage(r#"{"stream":true,"stream_options":{"include_usag\u0065":true}}"#),
            UsageRequest::Asked
        );
        assert_eq!(
            usage(
                r#"{"stream":true,"stream_options":{"include_usage":false},"stream_options":{"include_usage":true}}"#
            ),
            UsageRequest::Asked
        );
        for ambiguous in [
            r#"{"stream":1}"#,
            r#"{"stream":"true"}"#,
            r#"{"stream":[true]}"#,
            r#"{"stream":true,"stream_options":"x"}"#,
            r#"{"stream":true,"stream_options":[]}"#,
            r#"{"stream":true,"stream_options":{"include_usage":1}}"#,
            r#"{"stream":true,"stream_options":{"include_usage":{}}}"#,
        ] {
            assert_eq!(usage(ambiguous), UsageRequest::Ambiguous, "{ambiguous}");
        }
        let big = format!(
            r#"{{"stream":true,"stream_options":{{"x":"{}"}}}}"#,
            "a".repeat(OPTIONS_CAP)
        );
        assert_eq!(usage(&big), UsageRequest::Ambiguous);
    }

    const VLLM_MODELS: &str = r#"{"object":"list","data":[{"id":"Qwen/Qwen3-0.6B","object":"model","created":1732000000,"owned_by":"vllm","root":"/models/qwen3","parent":null,"max_model_len":32768,"permission":[{"id":"modelperm-1","object":"model_permission"}]},{"id":"lora-sql","object":"model","created":1732000000,"owned_by":"vllm","root":"/adapters/sql","parent":"Qwen/Qwen3-0.6B","max_model_len":null,"permission":[]},{"id":"secret-base","object":"model","created":1732000000,"owned_by":"vllm","root":"/models/secret","parent":null}]}"#;

    const LLAMACPP_MODELS: &str = r#"{"models":[{"name":"tiny.gguf","model":"tiny.gguf","modified_at":"","size":"","digest":"","type":"model","description":"","tags":[""],"capabilities":["completion"],"parameters":"","details":{"parent_model":"","format":"gguf","family":"","families":[""],"parameter_size":"","quantization_level":""}}],"object":"list","data":[{"id":"tiny.gguf","object":"model","created":1732000000,"owned_by":"llamacpp","meta":{"vocab_type":1,"n_vocab":260}}]}"#;

    fn ids(body: &[u8]) -> Vec<String> {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn model_lists_keep_only_allowed_entries() {
        let m = Models::new(["Qwen/Qwen3-0.6B", "lora-*"]).unwrap();
        let out = filter_model_list(VLLM_MODELS.as_bytes(), &m).unwrap();
        assert_eq!(ids(&out), ["Qwen/Qwen3-0.6B", "lora-sql"]);
        let original: serde_json::Value = serde_json::from_str(VLLM_MODELS).unwrap();
        let filtered: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(filtered["data"][1], original["data"][1]);
        assert_eq!(filtered["object"], "list");

        let only_lora = Models::new(["lora-*"]).unwrap();
        let out = filter_model_list(VLLM_MODELS.as_bytes(), &only_lora).unwrap();
        assert_eq!(ids(&out), ["lora-sql"]);
        let none = Models::new(["other"]).unwrap();
        let out = filter_model_list(VLLM_MODELS.as_bytes(), &none).unwrap();
        assert_eq!(out, br#"{"object":"list","data":[]}"#);
    }

    #[test]
    fn llama_cpp_lists_are_filtered_in_both_copies() {
        let tiny = Models::new(["tiny.gguf"]).unwrap();
        let out = filter_model_list(LLAMACPP_MODELS.as_bytes(), &tiny).unwrap();
        assert_eq!(out, LLAMACPP_MODELS.as_bytes());
        let other = Models::new(["other"]).unwrap();
        let out = filter_model_list(LLAMACPP_MODELS.as_bytes(), &other).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["models"], serde_json::json!([]));
        assert_eq!(v["data"], serde_json::json!([]));
    }

    #[test]
    fn entries_that_are_not_plainly_allowed_are_dropped() {
        let m = Models::new(["a"]).unwrap();
        let body = br#"{"data":[{"id":"a"},{"id":"a","id":"b"},{"id":1},{"id":["a"]},{"object":"model"},"a",["a"],{"id":"a\ud800"},{"id":"\u0061","x":{"id":"b"}}]}"#;
        let out = filter_model_list(body, &m).unwrap();
        assert_eq!(
            out,
            br#"{"data":[{"id":"a"},{"id":"\u0061","x":{"id":"b"}}]}"#
        );
        // A later `data` replaces the first for the client: both are filtered.
        let body = br#"{"data":[{"id":"b"}],"data":[{"id":"a"},{"id":"c"}]}"#;
        let out = filter_model_list(body, &m).unwrap();
        assert_eq!(out, br#"{"data":[],"data":[{"id":"a"}]}"#);
    }

    #[test]
    fn unreadable_model_lists_are_errors() {
        let m = Models::new(["a"]).unwrap();
        assert_eq!(
            filter_model_list(b"{\"data\":[", &m),
            Err(ListError::Json(ScanError::Incomplete))
        );
        assert_eq!(
            filter_model_list(br#"{"object":"list"}"#, &m),
            Err(ListError::NotAList)
        );
        assert_eq!(
            filter_model_list(br#"{"data":{"id":"b"}}"#, &m),
            Err(ListError::NotAList)
        );
        assert_eq!(
            filter_model_list(br#"{"data":{"x":[{"id":"b"}]},"models":[]}"#, &m),
            Err(ListError::NotAList)
        );
        let big = vec![b' '; MODEL_LIST_CAP + 1];
        assert_eq!(filter_model_list(&big, &m), Err(ListError::TooLarge));
    }

    /// Writes `s` as a JSON string, escaping a random selection of its characters as `\u`
    /// (surrogate pairs beyond the BMP) and the rest as serde_json would.
    fn spell(s: &str, escape: &[bool]) -> String {
        let mut out = String::from("\"");
        for (i, c) in s.chars().enumerate() {
            if escape.get(i).copied().unwrap_or(false) {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            } else {
                let one = serde_json::to_string(&c.to_string()).unwrap();
                out.push_str(&one[1..one.len() - 1]);
            }
        }
        out.push('"');
        out
    }

    fn member() -> impl Strategy<Value = (String, serde_json::Value)> {
        let value = prop_oneof![
            ".{0,10}".prop_map(serde_json::Value::from),
            any::<i32>().prop_map(serde_json::Value::from),
            Just(serde_json::json!({"model": "nested", "role": "user"})),
            Just(serde_json::json!(["model", {"model": "x"}])),
        ];
        (prop_oneof!["[a-z_]{1,8}", Just("model".to_string())], value)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Random bodies, keys and model spelled with random escapes, split anywhere: the
        /// decision is the whole body's, and it is what a last-wins JSON parser reads when the
        /// body has a single `model`.
        #[test]
        fn decisions_match_a_json_parser_and_ignore_splits(
            members in prop::collection::vec(member(), 0..6),
            name in "[a-zA-Z0-9/._-]{0,12}|.{0,6}",
            escapes in prop::collection::vec(any::<bool>(), 64),
            at in any::<usize>(),
            cuts in prop::collection::vec(any::<usize>(), 0..5),
        ) {
            let mut parts: Vec<String> = members
                .iter()
                .enumerate()
                .map(|(i, (k, v))| format!("{}:{}", spell(k, &escapes[i..]), v))
                .collect();
            let model_at = at % (parts.len() + 1);
            parts.insert(model_at, format!("{}: {}", spell("model", &escapes), spell(&name, &escapes[5..])));
            let body = format!("{{{}}}", parts.join(","));
            let body = body.as_bytes();

            let whole = scan(body).map(|i| i.model.unwrap_or_default());
            let v: serde_json::Value = serde_json::from_slice(body).unwrap();
            let mut models: Vec<Option<&serde_json::Value>> = members
                .iter()
                .filter(|(k, _)| k == "model")
                .map(|(_, v)| Some(v))
                .collect();
            let before = members[..model_at].iter().filter(|(k, _)| k == "model").count();
            models.insert(before, None);
            let want = match models[0] {
                Some(v) if !v.is_string() => Err(Undecidable::ModelNotString),
                _ if models.len() > 1 => Err(Undecidable::DuplicateModel),
                _ => Ok(v["model"].as_str().unwrap().to_owned()),
            };
            prop_assert_eq!(whole.clone(), want);

            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (body.len() + 1)).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut from = 0;
            for c in cuts {
                chunks.push(&body[from..c]);
                from = c;
            }
            chunks.push(&body[from..]);
            prop_assert_eq!(scan_chunks(&chunks, true).map(|i| i.model.unwrap_or_default()), whole.clone());
            let (held_decision, passed, held) = hold_back(&chunks);
            prop_assert_eq!(held_decision, whole);
            prop_assert!(json_scan::validate(&passed).is_err());
            prop_assert_eq!([passed, held].concat(), body);
        }
    }
}
