//! A streaming JSON tokenizer in constant memory: bytes go in as they arrive, in chunks split
//! anywhere (inside a `\u` escape, a UTF-8 sequence, a number, a key), and a [`Handler`] hears
//! about the structure. It is the one JSON reader behind the request-body inspection
//! ([`crate::policy::models`]) and the usage accounting on responses ([`crate::forward::usage`]).
//!
//! It validates strictly by RFC 8259 and checks what the origins check beyond it:
//!
//! - the document is one object (the only shape an OpenAI-style body or response has), with
//!   nothing but whitespace after it; one UTF-8 byte order mark may precede it, as Python's
//!   `json.loads` on bytes and nlohmann::json both skip one;
//! - the text is valid UTF-8 (overlong forms, encoded surrogates and code points past U+10FFFF
//!   refused), so UTF-16 and UTF-32 bodies, which Python would detect and decode, are refused:
//!   their NUL bytes are never valid here;
//! - `NaN`, `Infinity` and `-Infinity`, which Python's `json` accepts and nlohmann::json does not,
//!   are refused;
//! - nesting is at most [`MAX_DEPTH`] containers deep, so the container stack is one `u128`.
//!
//! Escapes `\uD800`–`\uDFFF` that do not form a pair are valid JSON text (Python keeps them as
//! lone surrogates); a captured string holding one is reported as [`Text::LoneSurrogate`], since
//! it has no UTF-8 form and no origin can match it against a name.
//!
//! Memory per tokenizer: a few words of state, plus the one string, number or raw value being
//! captured, each bounded by the cap its [`Capture`] names. Strings that are not captured (a
//! 20 MB base64 image) are validated at memory speed and never copied.

/// The deepest nesting accepted; a container inside the 128th is refused.
pub(crate) const MAX_DEPTH: usize = 128;

/// Keys are decoded up to this many bytes: every key a handler asks about is shorter.
pub(crate) const KEY_CAP: usize = 32;

/// Why bytes are not one JSON object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanError {
    /// Not JSON: a byte out of place, a bad escape or number, or data after the object.
    Syntax,
    /// Invalid UTF-8 (which includes UTF-16 and UTF-32 text).
    Utf8,
    /// Valid JSON so far, but the document is not an object.
    NotAnObject,
    /// Nested deeper than [`MAX_DEPTH`].
    TooDeep,
    /// The bytes ended before the object did (or there were none).
    Incomplete,
}

/// An object or an array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Object,
    Array,
}

/// What a handler wants kept of the value that follows a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Capture {
    /// Nothing: the value is only validated.
    Skip,
    /// A string decoded (escapes resolved), or a number's text, up to `cap` bytes.
    Text { cap: usize },
    /// The value's bytes exactly as written, whatever its type, up to `cap` bytes.
    Raw { cap: usize },
}

/// A captured (or skipped) string, number or raw value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Text<'a> {
    /// Not asked for.
    Skipped,
    /// The whole text.
    Whole(&'a [u8]),
    /// Longer than the cap.
    TooLong,
    /// A string with an unpaired `\uD800`–`\uDFFF` escape.
    LoneSurrogate,
}

/// A scalar value, reported when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scalar<'a> {
    String(Text<'a>),
    Number(Text<'a>),
    Bool(bool),
    Null,
}

/// What a reader of the structure is told. Depths count containers: the top-level object is
/// depth 1, its members' keys and scalar values are at depth 1, a container that is such a
/// member opens at depth 2. `at` is the index of the bracket in the chunk being fed.
pub(crate) trait Handler {
    /// A member's key, decoded up to [`KEY_CAP`] bytes; the answer applies to its value.
    fn key(&mut self, _depth: usize, _key: Text<'_>) -> Capture {
        Capture::Skip
    }
    /// A scalar member or element of the container at `depth` ended.
    fn scalar(&mut self, _depth: usize, _value: Scalar<'_>) {}
    /// A container opened; `depth` is its own.
    fn open(&mut self, _depth: usize, _kind: Kind, _at: usize) {}
    /// A container closed; `depth` is its own.
    fn close(&mut self, _depth: usize, _kind: Kind, _at: usize) {}
    /// The raw bytes of a value captured with [`Capture::Raw`], after its other events. A raw
    /// capture asked for inside another is not made.
    fn raw(&mut self, _depth: usize, _raw: Text<'_>) {}
}

mod bytes;
mod capture;
mod tokenizer;

pub(crate) use tokenizer::Tokenizer;

/// Validates a whole document at once.
#[cfg(test)]
pub(crate) fn validate(bytes: &[u8]) -> Result<(), ScanError> {
    struct Nothing;
    impl Handler for Nothing {}
    let mut t = Tokenizer::new();
    t.feed(bytes, &mut Nothing)?;
    t.finish()
}

#[cfg(test)]
mod tests {
    use super::bytes::{is_ws, plain_run, BOM, STRING_STOP};
    use super::*;
    use proptest::prelude::*;

    /// Records every event as text, to compare a whole feed with a split one.
    #[derive(Default)]
    struct Log {
        events: Vec<String>,
        capture: Option<Capture>,
    }

    fn text(t: Text<'_>) -> String {
        match t {
            Text::Skipped => "skipped".into(),
            Text::Whole(b) => format!("{:?}", String::from_utf8_lossy(b)),
            Text::TooLong => "too_long".into(),
            Text::LoneSurrogate => "lone".into(),
        }
    }

    impl Handler for Log {
        fn key(&mut self, depth: usize, key: Text<'_>) -> Capture {
            self.events.push(format!("key {depth} {}", text(key)));
            self.capture.unwrap_or(Capture::Text { cap: 64 })
        }
        fn scalar(&mut self, depth: usize, value: Scalar<'_>) {
            let v = match value {
                Scalar::String(t) => format!("str {}", text(t)),
                Scalar::Number(t) => format!("num {}", text(t)),
                Scalar::Bool(b) => format!("bool {b}"),
                Scalar::Null => "null".into(),
            };
            self.events.push(format!("scalar {depth} {v}"));
        }
        fn open(&mut self, depth: usize, kind: Kind, _at: usize) {
            self.events.push(format!("open {depth} {kind:?}"));
        }
        fn close(&mut self, depth: usize, kind: Kind, _at: usize) {
            self.events.push(format!("close {depth} {kind:?}"));
        }
        fn raw(&mut self, depth: usize, raw: Text<'_>) {
            self.events.push(format!("raw {depth} {}", text(raw)));
        }
    }

    fn run(chunks: &[&[u8]], capture: Option<Capture>) -> (Result<(), ScanError>, Vec<String>) {
        let mut t = Tokenizer::new();
        let mut log = Log {
            capture,
            ..Log::default()
        };
        for c in chunks {
            if let Err(e) = t.feed(c, &mut log) {
                return (Err(e), log.events);
            }
        }
        (t.finish(), log.events)
    }

    fn every_split(doc: &[u8], capture: Option<Capture>) -> (Result<(), ScanError>, Vec<String>) {
        let whole = run(&[doc], capture);
        for cut in 0..=doc.len() {
            let (a, b) = doc.split_at(cut);
            assert_eq!(run(&[a, b], capture), whole, "split at {cut} of {doc:?}");
        }
        let bytes: Vec<&[u8]> = doc.chunks(1).collect();
        assert_eq!(run(&bytes, capture), whole, "byte by byte: {doc:?}");
        whole
    }

    #[test]
    fn valid_objects_pass_whole_and_split_anywhere() {
        for doc in [
            &br#"{}"#[..],
            br#" {"a":1} "#,
            br#"{"a":[1,-2.5e+3,0,-0,1E9,true,false,null,"x",{},[]]}"#,
            "\u{feff}{\"a\":\"\u{e9}\u{20ac}\u{1f600}\"}".as_bytes(),
            br#"{"e":"\"\\\/\b\f\n\r\t\u0041\ud83d\ude00"}"#,
            b"{\r\n\t\"k\" : [ 1 , 2 ] \n}\n",
        ] {
            assert_eq!(every_split(doc, None).0, Ok(()), "{doc:?}");
        }
    }

    #[test]
    fn invalid_documents_fail_whole_and_split_anywhere() {
        for (doc, want) in [
            (&b""[..], ScanError::Incomplete),
            (b"   ", ScanError::Incomplete),
            (b"{", ScanError::Incomplete),
            (b"{\"a\":1", ScanError::Incomplete),
            (b"[1]", ScanError::NotAnObject),
            (b"\"model\"", ScanError::NotAnObject),
            (b"1", ScanError::NotAnObject),
            (b"null", ScanError::NotAnObject),
            (b"{\"a\":1}x", ScanError::Syntax),
            (b"{\"a\":1}{}", ScanError::Syntax),
            (b"{\"a\":NaN}", ScanError::Syntax),
            (b"{\"a\":Infinity}", ScanError::Syntax),
            (b"{\"a\":-Infinity}", ScanError::Syntax),
            (b"{\"a\":01}", ScanError::Syntax),
            (b"{\"a\":1.}", ScanError::Syntax),
            (b"{\"a\":.5}", ScanError::Syntax),
            (b"{\"a\":1e}", ScanError::Syntax),
            (b"{\"a\":+1}", ScanError::Syntax),
            (b"{\"a\":-}", ScanError::Syntax),
            (b"{\"a\":tru}", ScanError::Syntax),
            (b"{\"a\":True}", ScanError::Syntax),
            (b"{\"a\":1,}", ScanError::Syntax),
            (b"{,}", ScanError::Syntax),
            (b"{\"a\" 1}", ScanError::Syntax),
            (b"{a:1}", ScanError::Syntax),
            (b"{'a':1}", ScanError::Syntax),
            (b"{\"a\":[1,]}", ScanError::Syntax),
            (b"{\"a\":[1}", ScanError::Syntax),
            (b"{\"a\":{]}", ScanError::Syntax),
            (b"{\"a\":\"\x01\"}", ScanError::Syntax),
            (b"{\"a\":\"\\x\"}", ScanError::Syntax),
            (b"{\"a\":\"\\u12G4\"}", ScanError::Syntax),
            (b"{\"a\":\"\xff\"}", ScanError::Utf8),
            (b"{\"a\":\"\xc0\xaf\"}", ScanError::Utf8),
            (b"{\"a\":\"\xed\xa0\x80\"}", ScanError::Utf8),
            (b"{\"a\":\"\xf4\x90\x80\x80\"}", ScanError::Utf8),
            (b"{\"a\":\"\xe2\x82\"}", ScanError::Utf8),
            (b"\xef\xbb\xbf\xef\xbb\xbf{}", ScanError::Utf8),
            (b"\xef\xbb{}", ScanError::Utf8),
            (b" \xef\xbb\xbf{}", ScanError::Utf8),
            (b"\xfe\xff\x00{\x00}", ScanError::Utf8),
            (b"{\x00\"\x00a\x00\"\x00:\x001\x00}\x00", ScanError::Syntax),
            (b"\x00{\x00}", ScanError::Syntax),
            (b"{\"a\":1}\x00", ScanError::Syntax),
        ] {
            assert_eq!(every_split(doc, None).0, Err(want), "{doc:?}");
        }
    }

    #[test]
    fn keys_and_captured_values_are_decoded() {
        let (r, events) = every_split(
            br#"{"mod\u0065l":"a\u00e9\ud83d\ude00\n","n":[12,{"x":-3.5e2}],"t":true}"#,
            None,
        );
        assert_eq!(r, Ok(()));
        assert_eq!(
            events,
            [
                "open 1 Object",
                "key 1 \"model\"",
                "scalar 1 str \"aé😀\\n\"",
                "key 1 \"n\"",
                "open 2 Array",
                "scalar 2 num skipped",
                "open 3 Object",
                "key 3 \"x\"",
                "scalar 3 num \"-3.5e2\"",
                "close 3 Object",
                "close 2 Array",
                "key 1 \"t\"",
                "scalar 1 bool true",
                "close 1 Object",
            ]
        );
    }

    #[test]
    fn lone_surrogates_are_valid_but_not_decodable() {
        for doc in [
            &br#"{"a":"\ud800"}"#[..],
            br#"{"a":"\udc00"}"#,
            br#"{"a":"\ud800x"}"#,
            br#"{"a":"\ud800\u0041"}"#,
            br#"{"a":"\ud800\ud800\udc00"}"#,
        ] {
            let (r, events) = every_split(doc, None);
            assert_eq!(r, Ok(()), "{doc:?}");
            assert_eq!(events[2], "scalar 1 str lone", "{doc:?}");
        }
        let (_, events) = every_split(br#"{"\ud800":1}"#, None);
        assert_eq!(events[1], "key 1 lone");
    }

    #[test]
    fn captures_stop_at_their_cap() {
        let cap = Some(Capture::Text { cap: 3 });
        let (_, events) = every_split(br#"{"a":"abc","b":"abcd","c":1234,"d":"\u00e9x"}"#, cap);
        assert_eq!(events[2], "scalar 1 str \"abc\"");
        assert_eq!(events[4], "scalar 1 str too_long");
        assert_eq!(events[6], "scalar 1 num too_long");
        assert_eq!(events[8], "scalar 1 str \"éx\"");
        let long_key = format!("{{\"{}\":1}}", "k".repeat(KEY_CAP + 1));
        let (_, events) = every_split(long_key.as_bytes(), None);
        assert_eq!(events[1], "key 1 too_long");
    }

    #[test]
    fn raw_capture_keeps_the_value_as_written() {
        let raw = Some(Capture::Raw { cap: 40 });
        let doc = br#"{"o": { "x" : [1, "}"] } ,"s":"a\"b","n":-1.5e3 ,"t":true,"z":null}"#;
        let (r, events) = every_split(doc, raw);
        assert_eq!(r, Ok(()));
        let raws: Vec<&String> = events.iter().filter(|e| e.starts_with("raw")).collect();
        assert_eq!(
            raws,
            [
                r#"raw 1 "{ \"x\" : [1, \"}\"] }""#,
                r#"raw 1 "\"a\\\"b\"""#,
                r#"raw 1 "-1.5e3""#,
                r#"raw 1 "true""#,
                r#"raw 1 "null""#,
            ]
        );
        let (_, events) = every_split(br#"{"o":[1,2,3,4,5,6]}"#, Some(Capture::Raw { cap: 5 }));
        assert!(events.contains(&"raw 1 too_long".to_string()));
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = |n: usize| format!("{{\"a\":{}{}}}", "[".repeat(n), "]".repeat(n));
        assert_eq!(validate(deep(MAX_DEPTH - 1).as_bytes()), Ok(()));
        assert_eq!(
            validate(deep(MAX_DEPTH).as_bytes()),
            Err(ScanError::TooDeep)
        );
        assert_eq!(
            validate("[".repeat(100_000).as_bytes()),
            Err(ScanError::NotAnObject)
        );
        let objects = format!("{}{}", "{\"a\":".repeat(MAX_DEPTH), "1");
        assert_eq!(validate(objects.as_bytes()), Err(ScanError::Incomplete));
        let objects = format!("{}{}", "{\"a\":".repeat(MAX_DEPTH + 1), "1");
        assert_eq!(validate(objects.as_bytes()), Err(ScanError::TooDeep));
    }

    #[test]
    fn the_fast_string_run_stops_at_every_byte_that_matters() {
        for stop in 0..=255u8 {
            for at in 0..20 {
                let mut bytes = vec![b'a'; 24];
                bytes[at] = stop;
                let want = if STRING_STOP[usize::from(stop)] {
                    at
                } else {
                    24
                };
                assert_eq!(plain_run(&bytes), want, "byte {stop:#x} at {at}");
            }
        }
        assert_eq!(plain_run(b""), 0);
        assert_eq!(plain_run(b"abc"), 3);
    }

    #[test]
    fn errors_stick() {
        let mut t = Tokenizer::new();
        struct Nothing;
        impl Handler for Nothing {}
        assert_eq!(t.feed(b"{x", &mut Nothing), Err(ScanError::Syntax));
        assert_eq!(t.feed(b"}", &mut Nothing), Err(ScanError::Syntax));
        assert_eq!(t.finish(), Err(ScanError::Syntax));
        t.reset();
        assert_eq!(t.feed(b"{}", &mut Nothing), Ok(()));
        assert_eq!(t.finish(), Ok(()));
    }

    /// serde_json, which follows RFC 8259 strictly, is the reference for validity. It differs
    /// from this tokenizer only where this one is meant to differ: a leading byte order mark and
    /// top-level values other than objects. Its `IgnoredAny` judges neither the pairing of `\u`
    /// escapes (as Python does not) nor UTF-8 inside strings (checked here on the whole text).
    fn serde_says(doc: &[u8]) -> bool {
        let doc = doc.strip_prefix(&BOM[..]).unwrap_or(doc);
        let starts_with_object = doc.iter().find(|b| !is_ws(**b)).is_some_and(|&b| b == b'{');
        starts_with_object
            && std::str::from_utf8(doc).is_ok()
            && serde_json::from_slice::<serde::de::IgnoredAny>(doc).is_ok()
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            ".{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(6, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(".{0,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn document() -> impl Strategy<Value = Vec<u8>> {
        (
            prop::collection::btree_map("[a-z]{0,6}", json_value(), 0..6),
            any::<bool>(),
        )
            .prop_map(|(m, pretty)| {
                let v = serde_json::Value::Object(m.into_iter().collect());
                if pretty {
                    serde_json::to_vec_pretty(&v).unwrap()
                } else {
                    serde_json::to_vec(&v).unwrap()
                }
            })
    }

    /// Bytes that JSON cares about, so that random edits often stay near-valid.
    fn mutation() -> impl Strategy<Value = (usize, u8, u8)> {
        let byte = prop_oneof![
            prop::sample::select(&b"{}[]:,\"\\ \n\t0123456789-+.eEtrufalsn/u"[..]),
            any::<u8>(),
        ];
        (any::<usize>(), 0u8..3, byte)
    }

    /// Generated objects, some of them broken by a few byte edits.
    fn mutated() -> impl Strategy<Value = Vec<u8>> {
        (document(), prop::collection::vec(mutation(), 0..4)).prop_map(|(mut doc, edits)| {
            for (at, op, byte) in edits {
                let at = at % (doc.len() + 1);
                match op {
                    0 => doc.insert(at, byte),
                    1 if at < doc.len() => {
                        doc.remove(at);
                    }
                    _ if at < doc.len() => doc[at] = byte,
                    _ => doc.push(byte),
                }
            }
            doc
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn generated_objects_are_valid(doc in document()) {
            prop_assert_eq!(validate(&doc), Ok(()));
        }

        #[test]
        fn validity_agrees_with_serde_json(doc in mutated()) {
            prop_assert_eq!(
                validate(&doc).is_ok(),
                serde_says(&doc),
                "{:?}",
                String::from_utf8_lossy(&doc)
            );
        }

        #[test]
        fn splitting_never_changes_the_events(
            doc in mutated(),
            cuts in prop::collection::vec(any::<usize>(), 0..6),
        ) {
            let whole = run(&[&doc], None);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (doc.len() + 1)).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut from = 0;
            for c in cuts {
                chunks.push(&doc[from..c]);
                from = c;
            }
            chunks.push(&doc[from..]);
            prop_assert_eq!(run(&chunks, None), whole);
        }
    }
}
