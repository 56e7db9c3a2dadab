//! Config errors: every problem with its file, line, column and TOML key, all reported at
//! once, and the parser's own errors put in the file's terms.

use super::*;

// ---------------------------------------------------------------- errors

/// Everything wrong with one config file.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

/// One problem: where it is, which key, and what to do.
#[derive(Debug)]
pub struct Problem {
    /// The file the problem is in when it is not the config file: the key registry.
    pub file: Option<PathBuf>,
    /// 1-based line and column in the file; `None` for a command-line flag or a missing file.
    pub at: Option<(usize, usize)>,
    /// The key the problem is with; empty when the message names it itself.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            let file = p.file.as_deref().unwrap_or(&self.file).display();
            match p.at {
                Some((line, col)) => write!(f, "{file}:{line}:{col}: ")?,
                None => write!(f, "{file}: ")?,
            }
            if !p.key.is_empty() {
                write!(f, "{}: ", p.key)?;
            }
            f.write_str(&p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Collects problems with their positions in the source text.
pub(super) struct Problems<'a> {
    pub(super) source: &'a str,
    pub(super) list: Vec<Problem>,
    /// The file `source` is, when it is not the config file.
    pub(super) file: Option<PathBuf>,
}

impl Problems<'_> {
    /// Records a problem at `span` (a byte range of the file); an empty span at 0 means the
    /// value was not in the file (a default or a flag).
    pub(super) fn at(
        &mut self,
        span: std::ops::Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let at = (span != (0..0)).then(|| line_col(self.source, span.start));
        self.list.push(Problem {
            file: self.file.clone(),
            at,
            key: key.into(),
            message: message.into(),
        });
    }
}

pub(super) fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let before = &source[..offset.min(source.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// What the TOML parser reported, in the file's terms: an unknown key names its table and
/// the keys allowed there; a value of the wrong kind names its key and, for a duration or a
/// size, shows how to write one; anything else is a syntax error. Only the parser's message
/// is used, never its Display, which quotes the offending line: a value typed into the file
/// by mistake is not echoed into logs.
pub(super) fn file_problem(source: &str, e: &toml::de::Error) -> Problem {
    let message = e.message();
    let Some(span) = e.span() else {
        return Problem {
            file: None,
            at: None,
            key: "syntax".into(),
            message: message.to_owned(),
        };
    };
    let at = Some(line_col(source, span.start));
    let place = Place::of(source, span.start);
    let unknown = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once("`, "));
    if let Some((name, expected)) = unknown {
        let line = source.get(..span.start).and_then(|s| s.rsplit('\n').next());
        let in_header = line.is_some_and(|line| line.trim_start().starts_with('['));
        let message = match place.container() {
            Some(container) => format!("unknown key `{name}` in {container}; {expected}"),
            None if in_header => format!("unknown table `{name}`; {expected}"),
            None => format!("unknown key `{name}`; {expected}"),
        };
        return Problem {
            file: None,
            at,
            key: String::new(),
            message,
        };
    }
    let table_at_offset = source
        .get(span.start..)
        .filter(|rest| rest.starts_with('['))
        .and_then(|rest| rest.lines().next())
        .map(|header| header.split('#').next().unwrap_or(header).trim().to_owned());
    let Some(key) = place.value().or(table_at_offset) else {
        return Problem {
            file: None,
            at,
            key: "syntax".into(),
            message: message.to_owned(),
        };
    };
    let message = if message.ends_with("expected a duration") {
        "expected a duration with a unit, such as \"300s\" or \"5m\"".to_owned()
    } else if [
        "parsable string",
        "an integer or string",
        "integer overflow",
    ]
    .iter()
    .any(|size| message.ends_with(&format!("expected {size}")))
    {
        "expected a size, such as \"64MiB\" or \"512KiB\", or a number of bytes".to_owned()
    } else if ["usize", "u16", "u32", "u64"]
        .iter()
        .any(|int| message.ends_with(&format!("expected {int}")))
    {
        "expected a whole number, such as 100".to_owned()
    } else {
        message.to_owned()
    };
    Problem {
        file: None,
        at,
        key,
        message,
    }
}

/// Where a byte offset of the file sits: under which table header, inside which arrays and
/// inline tables (by the keys that hold them), and whether a value starts there.
pub(super) struct Place {
    /// The header as written, `[server]` or `[[inject]]`; `None` at the top of the file, or
    /// inside a header.
    pub(super) table: Option<String>,
    /// The keys of the arrays and inline tables the offset is inside, outermost first.
    pub(super) inside: Vec<String>,
    /// The key whose value starts at the offset.
    pub(super) key: Option<String>,
}

impl Place {
    /// A light scan of the text before `offset` for headers, keys, brackets, strings and
    /// comments: enough to name the place in a message.
    pub(super) fn of(source: &str, offset: usize) -> Self {
        let mut chars = source.get(..offset).unwrap_or(source).chars();
        let (mut table, mut inside) = (None, Vec::new());
        let (mut word, mut key) = (String::new(), String::new());
        let (mut in_word, mut after_equals, mut line_start) = (false, false, true);
        while let Some(c) = chars.next() {
            let bare = c.is_ascii_alphanumeric() || c == '_' || c == '-';
            match c {
                '[' if line_start && inside.is_empty() => {
                    let rest = chars.as_str();
                    let Some(end) = rest.find('\n') else {
                        // The offset is in this header: the name of a table, at the top level.
                        return Self {
                            table: None,
                            inside: Vec::new(),
                            key: None,
                        };
                    };
                    let header = rest[..end].split('#').next().unwrap_or_default();
                    table = Some(format!("[{}", header.trim()));
                    chars = rest[end..].chars();
                }
                '#' => {
                    chars.by_ref().find(|&c| c == '\n');
                }
                '"' | '\'' => {
                    while let Some(d) = chars.next() {
                        match d {
                            '\\' if c == '"' => {
                                chars.next();
                            }
                            '\n' => break,
                            d if d == c => break,
                            _ => {}
                        }
                    }
                }
                '[' | '{' => inside.push(key.clone()),
                ']' | '}' => {
                    inside.pop();
                }
                '=' => key.clone_from(&word),
                _ if bare && in_word => word.push(c),
                _ if bare => word = c.to_string(),
                _ => {}
            }
            in_word = bare;
            if !c.is_whitespace() {
                after_equals = c == '=';
            }
            line_start = c == '\n' || c == '#' || (line_start && c.is_whitespace());
        }
        inside.dedup();
        Self {
            table,
            inside,
            key: after_equals.then_some(key),
        }
    }

    /// The table or inline table the offset is in, e.g. `[server]` or `[auth] keys.allow`;
    /// `None` at the top of the file.
    pub(super) fn container(&self) -> Option<String> {
        let table = self.table.as_deref().unwrap_or_default();
        let name = format!("{table} {}", self.inside.join("."));
        Some(name.trim().to_owned()).filter(|name| !name.is_empty())
    }

    /// The key of the value at the offset, e.g. `[upstream] idle_timeout` or
    /// `[auth] keys.not_after`; a value inside an array is named by its array.
    pub(super) fn value(&self) -> Option<String> {
        let container = self.container();
        match (&self.key, container) {
            (Some(key), None) => Some(key.clone()),
            (Some(key), Some(container)) if self.inside.is_empty() => {
                Some(format!("{container} {key}"))
            }
            (Some(key), Some(container)) => Some(format!("{container}.{key}")),
            (None, container) => container.filter(|_| !self.inside.is_empty()),
        }
    }
}
