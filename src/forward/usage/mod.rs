//! Token usage read from upstream responses as they stream to the client, in constant memory:
//! the top-level `usage.prompt_tokens` and `usage.completion_tokens` of a JSON response
//! ([`JsonUsage`]) or of the SSE event that carries a `usage` object ([`SseUsage`]), read with
//! the same tokenizer as request bodies ([`crate::policy::json_scan`]).
//!
//! Both also keep the top-level `model` the origin answered with (in an SSE stream, that of the
//! event carrying the usage), for a request that named none itself.
//!
//! Counts are non-negative JSON integers; `null` or a missing count is 0 (embeddings report no
//! `completion_tokens`). A usage object with a count of any other form (negative, fractional,
//! exponent, string, over `u64`) yields no usage: the origin's figure cannot be read exactly.
//!
//! # The usage-only event
//!
//! When keygate asked for `stream_options.include_usage` itself
//! ([`crate::policy::models::UsageRequest::Insert`]), the stream gains one event its client did
//! not ask for: `data: {…,"choices":[],"usage":{…}}`. [`SseUsage::stripping`] removes exactly that
//! event, its lines and its terminating blank line, and passes every other byte on as the upstream
//! sent it. An event is a candidate only if all its lines are `data` fields and their data is one
//! JSON object whose top-level `choices` is an empty array and whose `usage` is an object.
//!
//! Nothing is delayed that a client could use: an SSE client acts on an event only at its
//! terminating blank line, and every event is passed on at the latest when that line arrives.
//! Earlier, as soon as an event cannot be the usage-only one (a non-empty `choices`, a line that is
//! not `data`, data that is not a JSON object such as `[DONE]`), its bytes so far are passed on and
//! the rest flows through as it comes. Until then the event's bytes are held, never more than
//! [`EVENT_HOLD_CAP`]: an event still undecided when a chunk would take it past that is passed on
//! and can no longer be removed (its usage is still read: parsing holds no bytes). Memory per
//! stream is that cap at most, plus the tokenizer's few words.
//!
//! With `include_usage`, OpenAI's own API adds `"usage":null` to every other chunk; vLLM
//! (`exclude_unset`) and llama.cpp do not. Those members are left alone: removing them would
//! rewrite every token event, and OpenAI's client libraries read a missing and a null `usage`
//! alike. Two origins also move a field onto the usage chunk when it is asked for: llama.cpp its
//! `timings`, vLLM its `system_fingerprint` (otherwise on the chunk with `finish_reason`). Clients
//! of those origins lose that field when keygate removes the chunk.
//!
//! Line ends are LF, CRLF or CR, as the SSE specification allows, and may be split across
//! chunks. An event the stream ends inside is passed on as it is and not counted: SSE clients
//! discard it too.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use crate::policy::json_scan::{Capture, Handler, Kind, Scalar, Text, Tokenizer};
use crate::policy::models::MODEL_CAP;

pub(crate) mod sse;

pub(crate) use self::sse::SseUsage;

/// The most bytes of one event held back while it might be the usage-only event.
pub(crate) const EVENT_HOLD_CAP: usize = 64 * 1024;

/// The tokens one response reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Count {
    #[default]
    Absent,
    Value(u64),
    Invalid,
}

impl Count {
    fn of(value: Scalar<'_>) -> Self {
        match value {
            Scalar::Null => Count::Absent,
            Scalar::Number(Text::Whole(digits)) if digits.iter().all(u8::is_ascii_digit) => {
                std::str::from_utf8(digits)
                    .ok()
                    .and_then(|d| d.parse().ok())
                    .map_or(Count::Invalid, Count::Value)
            }
            _ => Count::Invalid,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Top {
    #[default]
    Other,
    Usage,
    Choices,
    Model,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum UsageValue {
    #[default]
    Absent,
    Null,
    Object,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Choices {
    #[default]
    Absent,
    /// The array is open and has no element yet.
    Open,
    Empty,
    NonEmpty,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CountKey {
    Prompt,
    Completion,
}

/// What one JSON document says about usage (the last of duplicate keys).
#[derive(Debug, Default)]
struct UsageFields {
    top: Top,
    usage: UsageValue,
    in_usage: bool,
    count_key: Option<CountKey>,
    prompt: Count,
    completion: Count,
    choices: Choices,
    /// The top-level `model` string, valid when `has_model`; the buffer is reused from event
    /// to event, so a stream's token events cost no allocation for it.
    model: String,
    has_model: bool,
}

/// Digits of the largest `u64`, plus one so that a longer number reads as too long.
const COUNT_CAP: usize = 21;

impl Handler for UsageFields {
    fn key(&mut self, depth: usize, key: Text<'_>) -> Capture {
        match depth {
            1 => {
                self.top = match key {
                    Text::Whole(b"usage") => {
                        self.usage = UsageValue::Absent;
                        self.prompt = Count::Absent;
                        self.completion = Count::Absent;
                        Top::Usage
                    }
                    Text::Whole(b"choices") => {
                        self.choices = Choices::Absent;
                        Top::Choices
                    }
                    Text::Whole(b"model") => {
                        self.has_model = false;
                        Top::Model
                    }
                    _ => Top::Other,
                };
                match self.top {
                    Top::Model => Capture::Text { cap: MODEL_CAP },
                    _ => Capture::Skip,
                }
            }
            2 if self.in_usage => {
                self.count_key = match key {
                    Text::Whole(b"prompt_tokens") => Some(CountKey::Prompt),
                    Text::Whole(b"completion_tokens") => Some(CountKey::Completion),
                    _ => None,
                };
                match self.count_key {
                    Some(_) => Capture::Text { cap: COUNT_CAP },
                    None => Capture::Skip,
                }
            }
            _ => Capture::Skip,
        }
    }

    fn scalar(&mut self, depth: usize, value: Scalar<'_>) {
        match depth {
            1 => match self.top {
                Top::Usage if value == Scalar::Null => self.usage = UsageValue::Null,
                Top::Usage => self.usage = UsageValue::Other,
                Top::Choices => self.choices = Choices::Other,
                Top::Model => {
                    if let Scalar::String(Text::Whole(name)) = value {
                        if let Ok(name) = std::str::from_utf8(name) {
                            self.model.clear();
                            self.model.push_str(name);
                            self.has_model = true;
                        }
                    }
                }
                Top::Other => {}
            },
            2 if self.in_usage => match self.count_key {
                Some(CountKey::Prompt) => self.prompt = Count::of(value),
                Some(CountKey::Completion) => self.completion = Count::of(value),
                None => {}
            },
            2 if self.choices == Choices::Open => self.choices = Choices::NonEmpty,
            _ => {}
        }
    }

    fn open(&mut self, depth: usize, kind: Kind, _at: usize) {
        match depth {
            2 => match (self.top, kind) {
                (Top::Usage, Kind::Object) => {
                    self.usage = UsageValue::Object;
                    self.in_usage = true;
                    self.count_key = None;
                }
                (Top::Usage, Kind::Array) => self.usage = UsageValue::Other,
                (Top::Choices, Kind::Array) => self.choices = Choices::Open,
                (Top::Choices, Kind::Object) => self.choices = Choices::Other,
                (Top::Model | Top::Other, _) => {}
            },
            3 if self.in_usage => match self.count_key.take() {
                Some(CountKey::Prompt) => self.prompt = Count::Invalid,
                Some(CountKey::Completion) => self.completion = Count::Invalid,
                None => {}
            },
            3 if self.choices == Choices::Open => self.choices = Choices::NonEmpty,
            _ => {}
        }
    }

    fn close(&mut self, depth: usize, _kind: Kind, _at: usize) {
        if depth == 2 {
            self.in_usage = false;
            if self.choices == Choices::Open {
                self.choices = Choices::Empty;
            }
        }
    }
}

impl UsageFields {
    /// Ready for the next document, keeping the model buffer.
    fn reset(&mut self) {
        let mut model = std::mem::take(&mut self.model);
        model.clear();
        *self = Self {
            model,
            ..Self::default()
        };
    }

    fn model(&self) -> Option<&str> {
        self.has_model.then_some(self.model.as_str())
    }

    fn usage(&self) -> Option<Usage> {
        if self.usage != UsageValue::Object {
            return None;
        }
        let count = |c: Count| match c {
            Count::Absent => Some((0, false)),
            Count::Value(v) => Some((v, true)),
            Count::Invalid => None,
        };
        let (prompt_tokens, p) = count(self.prompt)?;
        let (completion_tokens, c) = count(self.completion)?;
        (p || c).then_some(Usage {
            prompt_tokens,
            completion_tokens,
        })
    }

    /// The shape of the chunk `include_usage` adds: no choices, a usage object.
    fn usage_only(&self) -> bool {
        self.choices == Choices::Empty && self.usage == UsageValue::Object
    }

    /// Already known not to be that chunk.
    fn has_choices(&self) -> bool {
        matches!(self.choices, Choices::NonEmpty | Choices::Other)
    }

    /// A top-level `choices` array with at least one element: an event carrying tokens.
    fn has_nonempty_choices(&self) -> bool {
        self.choices == Choices::NonEmpty
    }
}

/// The usage of a JSON response body, read chunk by chunk.
#[derive(Debug, Default)]
pub struct JsonUsage {
    tokenizer: Tokenizer,
    fields: UsageFields,
}

impl JsonUsage {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the next chunk; once the body is known not to be JSON, chunks cost nothing.
    pub fn push(&mut self, chunk: &[u8]) {
        let _ = self.tokenizer.feed(chunk, &mut self.fields);
    }

    /// The usage, if the whole body was one JSON object with a readable top-level `usage`.
    pub fn finish(&self) -> Option<Usage> {
        self.tokenizer.finish().ok()?;
        self.fields.usage()
    }

    /// The top-level `model` read so far.
    pub fn model(&self) -> Option<&str> {
        self.fields.model()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A non-streamed chat completion from vLLM.
    const VLLM_JSON: &str = r#"{"id":"chatcmpl-9c1f","object":"chat.completion","created":1732000000,"model":"Qwen/Qwen3-0.6B","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!","tool_calls":[]},"logprobs":null,"finish_reason":"stop","stop_reason":null}],"usage":{"prompt_tokens":21,"total_tokens":27,"completion_tokens":6,"prompt_tokens_details":null},"prompt_logprobs":null}"#;

    /// A non-streamed chat completion from llama-server, with its `timings`.
    const LLAMACPP_JSON: &str = r#"{"choices":[{"finish_reason":"length","index":0,"message":{"role":"assistant","content":"abc"}}],"created":1732000000,"model":"tiny","system_fingerprint":"b5000-0a1b2c3d","object":"chat.completion","usage":{"completion_tokens":16,"prompt_tokens":9,"total_tokens":25},"id":"chatcmpl-Qx7","timings":{"prompt_n":9,"prompt_ms":1.2,"predicted_n":16,"predicted_ms":3.4}}"#;

    /// An embeddings response: no completion tokens.
    const EMBEDDINGS_JSON: &str = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-0.2]}],"model":"e5","usage":{"prompt_tokens":4,"total_tokens":4}}"#;

    fn json_usage(chunks: &[&[u8]]) -> Option<Usage> {
        let mut u = JsonUsage::new();
        for c in chunks {
            u.push(c);
        }
        u.finish()
    }

    fn json_every_split(body: &str) -> Option<Usage> {
        let body = body.as_bytes();
        let whole = json_usage(&[body]);
        for cut in 0..=body.len() {
            let (a, b) = body.split_at(cut);
            assert_eq!(json_usage(&[a, b]), whole, "split at {cut}");
        }
        whole
    }

    fn usage(prompt_tokens: u64, completion_tokens: u64) -> Option<Usage> {
        Some(Usage {
            prompt_tokens,
            completion_tokens,
        })
    }

    #[test]
    fn json_responses_report_their_usage() {
        assert_eq!(json_every_split(VLLM_JSON), usage(21, 6));
        assert_eq!(json_every_split(LLAMACPP_JSON), usage(9, 16));
        assert_eq!(json_every_split(EMBEDDINGS_JSON), usage(4, 0));
        assert_eq!(
            json_every_split(
                r#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":0}}"#
            ),
            usage(u64::MAX, 0)
        );
        assert_eq!(
            json_every_split(r#"{"usage":{"prompt_tokens":1,"completion_tokens":null}}"#),
            usage(1, 0)
        );
        // The last duplicate wins, as in the client's parser.
        assert_eq!(
            json_every_split(
                r#"{"usage":{"prompt_tokens":1,"prompt_tokens":2,"completion_tokens":3}}"#
            ),
            usage(2, 3)
        );
        assert_eq!(
            json_every_split(r#"{"usage":{"prompt_tokens":1},"usage":{"completion_tokens":3}}"#),
            usage(0, 3)
        );
    }

    #[test]
    fn the_model_the_origin_answered_with_is_kept() {
        let mut u = JsonUsage::new();
        u.push(VLLM_JSON.as_bytes());
        assert_eq!(u.model(), Some("Qwen/Qwen3-0.6B"));
        let mut u = JsonUsage::new();
        u.push(br#"{"model":1,"usage":{"prompt_tokens":1}}"#);
        assert_eq!(u.model(), None);
        let mut u = JsonUsage::new();
        u.push(br#"{"model":"a","model":"b\u0063"}"#);
        assert_eq!(u.model(), Some("bc"));

        let (before, usage_event, after) = llamacpp_stream();
        let mut sse = SseUsage::stripping();
        run(
            &mut sse,
            &[format!("{before}{usage_event}{after}").as_bytes()],
        );
        assert_eq!(sse.model(), Some("tiny"));
        // Only the event carrying the usage names the model.
        let mut sse = SseUsage::counting();
        let stream = "data: {\"model\":\"a\",\"choices\":[{}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n";
        run(&mut sse, &[stream.as_bytes()]);
        assert_eq!(sse.usage(), usage(1, 0));
        assert_eq!(sse.model(), None);
    }

    #[test]
    fn unreadable_usage_is_none() {
        for body in [
            r#"{"usage":null}"#,
            r#"{"usage":{}}"#,
            r#"{"usage":{"total_tokens":5}}"#,
            r#"{"usage":[1,2]}"#,
            r#"{"usage":5}"#,
            r#"{"usage":{"prompt_tokens":-1,"completion_tokens":2}}"#,
            r#"{"usage":{"prompt_tokens":1.0,"completion_tokens":2}}"#,
            r#"{"usage":{"prompt_tokens":1e3,"completion_tokens":2}}"#,
            r#"{"usage":{"prompt_tokens":"1","completion_tokens":2}}"#,
            r#"{"usage":{"prompt_tokens":{"n":1},"completion_tokens":2}}"#,
            r#"{"usage":{"prompt_tokens":18446744073709551616,"completion_tokens":2}}"#,
            r#"{"usage":{"prompt_tokens":1,"completion_tokens":2},"usage":null}"#,
            r#"{"choices":[{"usage":{"prompt_tokens":1,"completion_tokens":2}}]}"#,
            r#"{"x":{"usage":{"prompt_tokens":1,"completion_tokens":2}}}"#,
            r#"{"usage":{"prompt_tokens":1,"completion_tokens":2}"#,
            r#"{"usage":{"prompt_tokens":1,"completion_tokens":2}} x"#,
            "data: {}",
            "",
        ] {
            assert_eq!(json_every_split(body), None, "{body}");
        }
        assert_eq!(
            json_usage(&[b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"]),
            None
        );
    }

    fn chunk(id: u32, content: &str, finish: &str) -> String {
        format!(
            r#"{{"id":"chatcmpl-{id}","object":"chat.completion.chunk","created":1732000000,"model":"Qwen/Qwen3-0.6B","choices":[{{"index":0,"delta":{{"content":"{content}"}},"logprobs":null,"finish_reason":{finish}}}]}}"#
        )
    }

    const VLLM_USAGE: &str = r#"{"id":"chatcmpl-7","object":"chat.completion.chunk","created":1732000000,"model":"Qwen/Qwen3-0.6B","choices":[],"usage":{"prompt_tokens":12,"total_tokens":15,"completion_tokens":3}}"#;

    const LLAMACPP_USAGE: &str = r#"{"choices":[],"created":1732000000,"id":"chatcmpl-Qx7","model":"tiny","system_fingerprint":"b5000-0a1b2c3d","object":"chat.completion.chunk","usage":{"completion_tokens":16,"prompt_tokens":9,"total_tokens":25},"timings":{"prompt_n":9,"prompt_ms":1.2,"predicted_n":16,"predicted_ms":3.4}}"#;

    /// A vLLM stream with the usage chunk keygate asked for: the events before it, the usage
    /// event, and the events after it.
    fn vllm_stream(eol: &str) -> (String, String, String) {
        let e = |data: &str| format!("data: {data}{eol}{eol}");
        let before = [
            e(&chunk(7, "", "null")
                .replace(r#""content":"""#, r#""role":"assistant","content":"""#)),
            e(&chunk(7, "Hel", "null")),
            e(&chunk(7, "lo", "null")),
            e(&chunk(7, "!", r#""stop""#)),
        ]
        .concat();
        (before, e(VLLM_USAGE), e("[DONE]"))
    }

    fn llamacpp_stream() -> (String, String, String) {
        let e = |data: &str| format!("data: {data}\n\n");
        let before = [
            e(r#"{"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],"created":1732000000,"id":"chatcmpl-Qx7","model":"tiny","system_fingerprint":"b5000-0a1b2c3d","object":"chat.completion.chunk"}"#),
            e(r#"{"choices":[{"finish_reason":null,"index":0,"delta":{"content":"\u00e9x"}}],"created":1732000000,"id":"chatcmpl-Qx7","model":"tiny","system_fingerprint":"b5000-0a1b2c3d","object":"chat.completion.chunk"}"#),
            e(r#"{"choices":[{"finish_reason":"length","index":0,"delta":{}}],"created":1732000000,"id":"chatcmpl-Qx7","model":"tiny","system_fingerprint":"b5000-0a1b2c3d","object":"chat.completion.chunk"}"#),
        ]
        .concat();
        (before, e(LLAMACPP_USAGE), e("[DONE]"))
    }

    /// Runs a stream through `sse`, cut into the given chunks; returns what passed.
    fn run(sse: &mut SseUsage, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&sse.push(&Bytes::copy_from_slice(c)));
        }
        out.extend_from_slice(&sse.finish());
        out
    }

    /// Every split of `stream` in two and byte by byte, stripping: the output is `want` and the
    /// usage `usage`.
    fn strip_every_split(stream: &str, want: &str, expect: Option<Usage>, stripped: u32) {
        let stream = stream.as_bytes();
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            let mut sse = SseUsage::stripping();
            let out = run(&mut sse, &[a, b]);
            assert_eq!(String::from_utf8_lossy(&out), want, "split at {cut}");
            assert_eq!(sse.usage(), expect, "split at {cut}");
            assert_eq!(sse.stripped(), stripped, "split at {cut}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        let mut sse = SseUsage::stripping();
        assert_eq!(String::from_utf8_lossy(&run(&mut sse, &bytes)), want);
        assert_eq!(sse.usage(), expect);
    }

    #[test]
    fn the_usage_only_event_is_removed_and_nothing_else() {
        for eol in ["\n", "\r\n", "\r"] {
            let (before, usage_event, after) = vllm_stream(eol);
            let stream = format!("{before}{usage_event}{after}");
            strip_every_split(&stream, &format!("{before}{after}"), usage(12, 3), 1);
        }
        let (before, usage_event, after) = llamacpp_stream();
        let stream = format!("{before}{usage_event}{after}");
        strip_every_split(&stream, &format!("{before}{after}"), usage(9, 16), 1);
    }

    #[test]
    fn counting_passes_every_byte_unchanged() {
        let (before, usage_event, after) = vllm_stream("\r\n");
        let stream = format!("{before}{usage_event}{after}");
        let bytes = stream.as_bytes();
        for cut in 0..=bytes.len() {
            let (a, b) = bytes.split_at(cut);
            let mut sse = SseUsage::counting();
            let first = sse.push(&Bytes::copy_from_slice(a));
            assert_eq!(first, a, "the first part passes at once, split at {cut}");
            let second = sse.push(&Bytes::copy_from_slice(b));
            assert_eq!(second, b);
            assert!(sse.finish().is_empty());
            assert_eq!(sse.usage(), usage(12, 3));
            assert_eq!(sse.stripped(), 0);
        }
    }

    #[test]
    fn token_events_pass_as_soon_as_they_cannot_be_the_usage_event() {
        let (before, usage_event, after) = vllm_stream("\n");
        let stream = format!("{before}{usage_event}{after}");
        let usage_at = before.len();
        let choices = r#""choices":[{"#;
        for cut in 0..=stream.len() {
            let mut sse = SseUsage::stripping();
            let out = sse.push(&Bytes::copy_from_slice(&stream.as_bytes()[..cut]));
            // Where the event being read at the cut started.
            let event_start = stream[..cut].rfind("\n\n").map_or(0, |i| i + 2);
            let decided = stream[event_start..cut].contains(choices)
                || stream[event_start..cut].starts_with("data: [");
            // What the client can have by now, counted in the original stream.
            let upto = if decided { cut } else { event_start };
            let want = if upto <= usage_at {
                upto
            } else {
                upto.max(usage_at + usage_event.len()) - usage_event.len()
            };
            let expected = format!("{before}{after}");
            assert!(
                String::from_utf8_lossy(&out) == expected[..want],
                "cut at {cut}: {} bytes out, {want} expected, usage at {usage_at}",
                out.len()
            );
        }
    }

    #[test]
    fn usage_in_an_event_with_choices_is_counted_and_kept() {
        // Older llama.cpp puts usage into the chunk with `finish_reason`.
        let stream = "data: {\"choices\":[{\"finish_reason\":\"stop\",\"index\":0,\"delta\":{}}],\"usage\":{\"completion_tokens\":247,\"prompt_tokens\":1085,\"total_tokens\":1332}}\n\ndata: [DONE]\n\n";
        strip_every_split(stream, stream, usage(1085, 247), 0);
        // vLLM's continuous usage stats: a running total in every chunk, the last is the total.
        let stream = [
            format!(
                "data: {}\n\n",
                chunk(1, "a", "null").replace(
                    "]}",
                    r#"],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#
                )
            ),
            format!(
                "data: {}\n\n",
                chunk(1, "b", "null").replace(
                    "]}",
                    r#"],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#
                )
            ),
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\n"
                .to_string(),
        ]
        .concat();
        let mut sse = SseUsage::counting();
        run(&mut sse, &[stream.as_bytes()]);
        assert_eq!(sse.usage(), usage(5, 2));
    }

    #[test]
    fn only_pure_data_events_of_the_usage_shape_are_removed() {
        for stream in [
            "event: usage\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n",
            ": note\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\nid: 7\n\n",
            "data: {\"choices\":[],\"usage\":null}\n\n",
            "data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n",
            "data: {\"choices\":{},\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n",
            "data: {\"choices\":[null],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}x\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\ndata: {}\n\n",
            "data: [DONE]\n\n",
            ": keep-alive\n\n",
            "\n\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n",
        ] {
            let mut sse = SseUsage::stripping();
            assert_eq!(
                String::from_utf8_lossy(&run(&mut sse, &[stream.as_bytes()])),
                stream
            );
            assert_eq!(sse.stripped(), 0, "{stream:?}");
        }
    }

    #[test]
    fn data_lines_join_like_the_sse_specification_says() {
        let stream = "data:{\"choices\":[],\ndata: \"usage\":{\"prompt_tokens\":1,\ndata\ndata:  \"completion_tokens\":2}}\n\ndata: [DONE]\n\n";
        strip_every_split(stream, "data: [DONE]\n\n", usage(1, 2), 1);
        // A newline inside a JSON string is not JSON: the event is kept and not counted.
        let stream =
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"x\":\"a\ndata: b\"}}\n\n";
        strip_every_split(stream, stream, None, 0);
    }

    #[test]
    fn a_large_undecided_event_passes_unremoved_but_counted() {
        let pad = "x".repeat(2 * EVENT_HOLD_CAP);
        let stream = format!(
            "data: {{\"pad\":\"{pad}\",\"choices\":[],\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":2}}}}\n\ndata: [DONE]\n\n"
        );
        let mut sse = SseUsage::stripping();
        let chunks: Vec<&[u8]> = stream.as_bytes().chunks(4096).collect();
        let mut out = Vec::new();
        for c in &chunks {
            out.extend_from_slice(&sse.push(&Bytes::copy_from_slice(c)));
            assert!(sse.held.len() <= EVENT_HOLD_CAP);
        }
        out.extend_from_slice(&sse.finish());
        assert!(out == stream.as_bytes());
        assert_eq!(sse.usage(), usage(1, 2));
        assert_eq!(sse.stripped(), 0);
    }

    #[test]
    fn an_event_cut_off_by_the_end_of_the_stream_is_passed_on_uncounted() {
        let stream = "data: [DONE]\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}";
        let mut sse = SseUsage::stripping();
        let first = sse.push(&Bytes::from_static(stream.as_bytes()));
        assert_eq!(first, "data: [DONE]\n\n");
        assert_eq!(sse.finish(), &stream["data: [DONE]\n\n".len()..]);
        assert_eq!(sse.usage(), None);
        // A blank line ended by CR at the very end still ends the event.
        let stream = format!("data: {VLLM_USAGE}\r\r");
        let mut sse = SseUsage::stripping();
        assert!(sse.push(&Bytes::from(stream)).is_empty());
        assert!(sse.finish().is_empty());
        assert_eq!(sse.stripped(), 1);
    }

    #[test]
    fn streamed_tokens_count_the_events_with_choices() {
        // vLLM: two role/content events and the one with `finish_reason`; llama.cpp: three.
        for ((before, usage_event, after), events) in
            [(vllm_stream("\n"), 4), (llamacpp_stream(), 3)]
        {
            let mut sse = SseUsage::stripping();
            run(&mut sse, &[before.as_bytes()]);
            assert_eq!(sse.streamed_tokens(), events, "{before}");
            run(&mut sse, &[usage_event.as_bytes(), after.as_bytes()]);
            assert_eq!(sse.streamed_tokens(), events, "usage and [DONE] add none");
        }
        let mut sse = SseUsage::counting();
        run(&mut sse, &[b"data: {\"choices\":[{\"delta\":{}}]"]);
        assert_eq!(sse.streamed_tokens(), 0, "an event the stream ends inside");
    }

    /// One SSE event of a random stream, and whether it is the usage-only one.
    fn event() -> impl Strategy<Value = (String, bool)> {
        prop_oneof![
            4 => ("[a-z é]{0,6}", any::<bool>()).prop_map(|(t, stop)| {
                let finish = if stop { r#""stop""# } else { "null" };
                (format!("data: {}", chunk(3, &t, finish)), false)
            }),
            1 => Just((": keep-alive".to_string(), false)),
            1 => Just(("data: [DONE]".to_string(), false)),
            1 => Just(("event: error\ndata: {\"error\":{\"message\":\"x\"}}".to_string(), false)),
            1 => Just((format!("data: {LLAMACPP_USAGE}"), true)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn random_streams_lose_exactly_their_usage_events(
            events in prop::collection::vec(event(), 0..8),
            eol in prop::sample::select(vec!["\n", "\r\n", "\r"]),
            cuts in prop::collection::vec(any::<usize>(), 0..8),
        ) {
            let mut stream = String::new();
            let mut want = String::new();
            let mut usages = 0;
            for (text, usage_only) in &events {
                let e = format!("{}{eol}{eol}", text.replace('\n', eol));
                stream.push_str(&e);
                if *usage_only {
                    usages += 1;
                } else {
                    want.push_str(&e);
                }
            }
            let bytes = stream.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut from = 0;
            for c in cuts {
                chunks.push(&bytes[from..c]);
                from = c;
            }
            chunks.push(&bytes[from..]);

            let mut sse = SseUsage::stripping();
            let out = run(&mut sse, &chunks);
            prop_assert_eq!(String::from_utf8_lossy(&out), want);
            prop_assert_eq!(sse.stripped(), usages);
            prop_assert_eq!(sse.usage(), if usages > 0 { usage(9, 16) } else { None });

            let mut sse = SseUsage::counting();
            prop_assert_eq!(run(&mut sse, &chunks), bytes);
            prop_assert_eq!(sse.usage(), if usages > 0 { usage(9, 16) } else { None });
        }
    }
}
