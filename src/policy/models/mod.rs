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
//! The key's [`Models`](crate::config::models::Models) (from the config) match the decoded name
//! byte for byte against exact names and `prefix*` patterns.
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
//! `stream_options.include_usage`. [`Inspected::usage_request`](request::Inspected::usage_request) says what to add when the client
//! did not ask: one more top-level `stream_options` member, inserted before the held-back `}`,
//! holding the client's own members followed by `"include_usage":true`. Python's `json` and
//! nlohmann::json both keep the last duplicate key, so the added member replaces the client's
//! and its `include_usage` replaces a `false` among the client's members. The response then
//! carries a usage-only event, which [`crate::forward::usage`] removes before the client sees it.
//! The body grows by the insertion, known only at its end, so such a request goes upstream
//! without its `Content-Length`: chunked over HTTP/1.1, which uvicorn and cpp-httplib read.

/// The longest model name read, in bytes after decoding; a longer one is undecidable.
pub(crate) const MODEL_CAP: usize = 512;

/// The longest client `stream_options` value kept, in bytes as written.
pub(crate) const OPTIONS_CAP: usize = 1024;

/// The most whitespace accepted after the body's top-level object.
pub(crate) const MAX_TRAILING: usize = 1024;

/// The largest `GET /v1/models` response body that [`filter_model_list`] reads.
pub(crate) const MODEL_LIST_CAP: usize = 4 << 20;

pub(crate) mod hold_back;
pub(crate) mod list;
pub(crate) mod request;
mod usage_request;

pub(crate) use hold_back::HoldBack;
pub(crate) use list::filter_model_list;
pub(crate) use request::{Scanner, Undecidable};
pub(crate) use usage_request::UsageRequest;

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::list::ListError;
    use super::request::{Flag, Inspected};
    use super::*;
    use crate::config::models::Models;
    use crate::policy::json_scan::{self, ScanError};
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

    /// A caller that finishes the scan of a refused body anyway still gets the refusal: a key
    /// with `models` is never given a decided body without a model.
    #[test]
    fn finishing_a_refused_body_still_refuses_it() {
        for (body, why) in [
            (
                &br#"{"model":"a","model":"b"}"#[..],
                Undecidable::DuplicateModel,
            ),
            (br#"{"model":1}"#, Undecidable::ModelNotString),
        ] {
            let mut s = Scanner::requiring_model();
            assert_eq!(s.feed(body), Err(why));
            assert_eq!(s.finish(), Err(why), "{body:?}");
        }
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
