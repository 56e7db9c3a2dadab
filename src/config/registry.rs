//! `[auth] registry`: a file of more keys, each stored as the SHA-256 digest of its value
//! with the policy fields a key has in the config. Read with the config before any socket is
//! opened, and read again, validated whole, on every reload (SIGHUP or a change to the file).
//! No key's value is in the file or anywhere in the process: the key check compares digests.
//!
//! ```toml
//! keys = [
//!   { name = "app2", sha256 = "<64 lower-case hex characters>", max_concurrent = 4 },
//! ]
//! ```

use sha2::{Digest, Sha256};

use super::*;

/// The registry file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    #[serde(default)]
    keys: Vec<Spanned<KeyFile>>,
}

/// The key registry: where it is, and the keys it held when it was last read.
#[derive(Debug, Clone)]
pub struct Registry {
    pub path: PathBuf,
    /// The file as it was just before it was last read, so a change made after that is
    /// noticed.
    pub stamp: Option<FileStamp>,
    pub keys: Vec<RegistryKey>,
    /// Every name `[auth] keys` gives, set or not, which no registry key may take.
    config_names: Vec<String>,
    /// The preset a key's `routes` apply to.
    preset: Option<&'static Preset>,
}

/// One key of the registry: its name, the SHA-256 of its value, and what it may do.
#[derive(Clone)]
pub struct RegistryKey {
    pub name: String,
    pub digest: [u8; 32],
    /// Where the entry is written, e.g. "registry /etc/keygate/keys.toml:3": named when
    /// two keys clash.
    pub origin: String,
    pub policy: Arc<KeyPolicy>,
}

impl fmt::Debug for RegistryKey {
    /// Leaves the digest out, as every output does.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryKey")
            .field("name", &self.name)
            .field("origin", &self.origin)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// Why a registry could not be read.
pub(super) enum Unread {
    /// The file itself: missing, unreadable.
    File(String),
    /// What is in it, each problem with its line.
    Problems(Vec<Problem>),
}

impl Registry {
    /// Reads the registry at `path` for a config whose keys with a value are `configured`
    /// and whose key names are `config_names`.
    pub(super) fn read(
        path: &Path,
        configured: &[KeySpec],
        config_names: Vec<String>,
        preset: Option<&'static Preset>,
        secrets: &dyn SecretSource,
    ) -> Result<Registry, Unread> {
        let stamp = FileStamp::of(path);
        let source = secrets.file(path).map_err(|e| {
            Unread::File(format!(
                "cannot read the key registry {}: {e}; create it, e.g. with keys = [] and \
                 the entries `keygate keygen --name NAME` prints",
                path.display()
            ))
        })?;
        let mut registry = Registry {
            path: path.to_owned(),
            stamp,
            keys: Vec::new(),
            config_names,
            preset,
        };
        registry.keys = registry
            .parse(source.expose(), configured)
            .map_err(Unread::Problems)?;
        Ok(registry)
    }

    /// The registry read again (SIGHUP or a change to the file), validated whole against
    /// the keys with a value `configured` now, or every problem, each with the file and line.
    pub fn reread(
        &self,
        configured: &[KeySpec],
        secrets: &dyn SecretSource,
    ) -> Result<Registry, String> {
        let read = Self::read(
            &self.path,
            configured,
            self.config_names.clone(),
            self.preset,
            secrets,
        );
        read.map_err(|unread| match unread {
            Unread::File(why) => why,
            Unread::Problems(problems) => ConfigError {
                file: self.path.clone(),
                problems,
            }
            .to_string()
            .replace('\n', "; "),
        })
    }

    /// The keys of `source`, or every problem with them.
    fn parse(&self, source: &str, configured: &[KeySpec]) -> Result<Vec<RegistryKey>, Vec<Problem>> {
        let mut p = Problems {
            source,
            list: Vec::new(),
            file: Some(self.path.clone()),
        };
        let file: RegistryFile = toml::from_str(source).map_err(|e| {
            let mut problem = file_problem(source, &e);
            problem.file = Some(self.path.clone());
            vec![problem]
        })?;
        let mut keys: Vec<(RegistryKey, std::ops::Range<usize>)> = Vec::new();
        for (i, entry) in file.keys.iter().enumerate() {
            let k = entry.get_ref();
            let key = format!("keys (name = \"{}\")", k.name);
            let mut problem = |why: String| p.at(entry.span(), &key, why);
            if !valid_key_name(&k.name) {
                problem("name must be 1-64 characters of A-Z a-z 0-9 . _ -".into());
            } else if self.config_names.contains(&k.name) {
                problem(
                    "the name is taken by a key in the config file's [auth] keys; names are \
                     unique across the config and the registry, so give one of them another"
                        .into(),
                );
            } else if file.keys[..i].iter().any(|e| e.get_ref().name == k.name) {
                problem("this name is used twice; every key needs its own name".into());
            }
            let sources = [
                ("env", k.env.is_some()),
                ("file", k.file.is_some()),
                ("optional", k.optional.is_some()),
            ];
            for (field, _) in sources.iter().filter(|(_, set)| *set) {
                problem(format!(
                    "{field} has no place in the registry, which holds each key as the SHA-256 \
                     of its value: write sha256 = \"<64 lower-case hex characters>\" instead; \
                     `keygate keygen --name {}` prints a new key and its entry",
                    k.name
                ));
            }
            let digest = match k.sha256.as_deref().map(digest_from_hex) {
                Some(Ok(digest)) => Some(digest),
                Some(Err(why)) => {
                    problem(format!(
                        "sha256 {why}; it must be 64 lower-case hex characters, the SHA-256 of \
                         the key. `keygate keygen --name {}` prints a new key and its entry",
                        k.name
                    ));
                    None
                }
                None => {
                    problem(format!(
                        "needs sha256 = \"<64 lower-case hex characters>\", the SHA-256 of the \
                         key; `keygate keygen --name {}` prints a new key and its entry",
                        k.name
                    ));
                    None
                }
            };
            let policy = Arc::new(policy(k, self.preset, &mut problem));
            if let Some(digest) = digest {
                let (line, _) = line_col(source, entry.span().start);
                keys.push((
                    RegistryKey {
                        name: k.name.clone(),
                        digest,
                        origin: format!("registry {}:{line}", self.path.display()),
                        policy,
                    },
                    entry.span(),
                ));
            }
        }
        let configured: Vec<(&str, &str, [u8; 32])> = configured
            .iter()
            .map(|k| (k.name.as_str(), k.origin.as_str(), k.digest()))
            .collect();
        for (i, (later, span)) in keys.iter().enumerate() {
            let earlier = keys[..i]
                .iter()
                .map(|(k, _)| (k.name.as_str(), k.origin.as_str(), k.digest));
            if let Some((name, origin, _)) = configured
                .iter()
                .copied()
                .chain(earlier)
                .find(|(_, _, digest)| *digest == later.digest)
            {
                let clash = SameValue {
                    first: (name.to_owned(), origin.to_owned()),
                    second: (later.name.clone(), later.origin.clone()),
                };
                p.at(
                    span.clone(),
                    format!("keys (name = \"{}\")", later.name),
                    clash.to_string(),
                );
            }
        }
        if p.list.is_empty() {
            Ok(keys.into_iter().map(|(k, _)| k).collect())
        } else {
            Err(p.list)
        }
    }
}

/// The 32 bytes of a digest written as 64 lower-case hex characters, or what is wrong with
/// it, without repeating any of it: a key pasted here by mistake stays out of the logs.
fn digest_from_hex(hex: &str) -> Result<[u8; 32], String> {
    if hex.len() != 64 {
        return Err(format!("has {} characters instead of 64", hex.chars().count()));
    }
    if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err("has characters other than 0-9 and a-f".into());
    }
    let mut digest = [0u8; 32];
    for (byte, pair) in digest.iter_mut().zip(hex.as_bytes().chunks(2)) {
        let nibble = |b: u8| match b {
            b'0'..=b'9' => b - b'0',
            _ => b - b'a' + 10,
        };
        *byte = nibble(pair[0]) << 4 | nibble(pair[1]);
    }
    Ok(digest)
}

/// The SHA-256 of `key` as the registry writes it: 64 lower-case hex characters.
pub fn sha256_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The registry entry for a key named `name` whose value is `key`, as `keygate keygen
/// --name` prints it, or why the name cannot be used.
pub fn registry_entry(name: &str, key: &str) -> Result<String, &'static str> {
    if !valid_key_name(name) {
        return Err("a key name must be 1-64 characters of A-Z a-z 0-9 . _ -");
    }
    Ok(format!(
        "{{ name = \"{name}\", sha256 = \"{}\" }},",
        sha256_hex(key)
    ))
}
