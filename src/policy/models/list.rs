//! The model list filter: the origin's `GET /v1/models` body with only the entries a key's
//! `models` allow, everything else as the origin wrote it.

use super::{MODEL_CAP, MODEL_LIST_CAP};
use crate::config::models::Models;
use crate::policy::json_scan::{Capture, Handler, Kind, Scalar, ScanError, Text, Tokenizer};

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
