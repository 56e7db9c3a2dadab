//! Where secret values come from: environment variables and files, read through one small
//! trait so tests hand in a map instead of mutating the process environment.
//!
//! Values are wrapped in [`Secret`], whose `Debug` never shows them.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::Path;

/// A secret value. `Debug` prints `<redacted>`; there is no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Reads secrets by environment-variable name or file path.
pub trait SecretSource {
    fn env(&self, name: &str) -> Option<Secret>;
    fn file(&self, path: &Path) -> io::Result<Secret>;
}

/// The real process environment and file system.
pub struct ProcessSecrets;

impl SecretSource for ProcessSecrets {
    fn env(&self, name: &str) -> Option<Secret> {
        std::env::var(name).ok().map(Secret)
    }

    /// Reads the file and trims one trailing newline (`\n` or `\r\n`), as written by
    /// `echo` or a Kubernetes Secret created from a file.
    fn file(&self, path: &Path) -> io::Result<Secret> {
        let mut text = std::fs::read_to_string(path)?;
        if text.ends_with('\n') {
            text.pop();
            if text.ends_with('\r') {
                text.pop();
            }
        }
        Ok(Secret(text))
    }
}

/// A fixed set of variables and files, for tests.
#[derive(Default, Clone)]
pub struct MapSecrets {
    pub env: HashMap<String, String>,
    pub files: HashMap<String, String>,
}

impl MapSecrets {
    pub fn with_env(mut self, name: &str, value: &str) -> Self {
        self.env.insert(name.to_owned(), value.to_owned());
        self
    }

    pub fn with_file(mut self, path: &str, value: &str) -> Self {
        self.files.insert(path.to_owned(), value.to_owned());
        self
    }
}

impl SecretSource for MapSecrets {
    fn env(&self, name: &str) -> Option<Secret> {
        self.env.get(name).cloned().map(Secret)
    }

    fn file(&self, path: &Path) -> io::Result<Secret> {
        path.to_str()
            .and_then(|p| self.files.get(p))
            .cloned()
            .map(Secret)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_debug_output_never_shows_the_value() {
        let s = Secret::new("sk-very-secret-value".into());
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(format!("{:?}", Some(&s)), "Some(<redacted>)");
    }

    #[test]
    fn file_secret_loses_exactly_one_trailing_newline() {
        let dir = std::env::temp_dir().join(format!("keygate-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        for (written, read) in [
            ("abc\n", "abc"),
            ("abc\r\n", "abc"),
            ("abc\n\n", "abc\n"),
            ("abc", "abc"),
        ] {
            std::fs::write(&path, written).unwrap();
            assert_eq!(ProcessSecrets.file(&path).unwrap().expose(), read);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
