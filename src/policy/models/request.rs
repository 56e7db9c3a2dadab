//! The request-side check: a [`Scanner`] reads a request body chunk by chunk and keeps its
//! top-level `model`, `stream` and `stream_options`, deciding the model or finding it
//! undecidable. See the parent module for how `model` is read.

use super::{MAX_TRAILING, MODEL_CAP, OPTIONS_CAP};
use crate::policy::json_scan::{Capture, Handler, Kind, Scalar, ScanError, Text, Tokenizer};

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
    pub(super) fn of(value: Scalar<'_>) -> Self {
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
pub(super) enum Options {
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
    pub(super) options: Options,
    pub(super) members: usize,
}
