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
    fn parse(
        &self,
        source: &str,
        configured: &[KeySpec],
    ) -> Result<Vec<RegistryKey>, Vec<Problem>> {
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
        return Err(format!(
            "has {} characters instead of 64",
            hex.chars().count()
        ));
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
pub(crate) fn sha256_hex(key: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::secrets::MapSecrets;

    const KEY: &str = "config-key-0123456789abcdef";
    const APP: &str = "app-key-0123456789abcdef";
    const OTHER: &str = "other-key-0123456789abcdef";
    const REGISTRY: &str = "/reg/keys.toml";

    fn main_config(keys: &str) -> String {
        format!("[auth]\nkeys = [{keys}]\nregistry = \"{REGISTRY}\"\n")
    }

    fn secrets(registry: &str) -> MapSecrets {
        MapSecrets::default()
            .with_env("API_KEY", KEY)
            .with_file(REGISTRY, registry)
    }

    /// The config `text` of test.toml read with `secrets`.
    fn parse(text: &str, secrets: &MapSecrets) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text, &Overrides::default(), secrets)
    }

    fn load(registry: &str) -> Result<Config, ConfigError> {
        let text = main_config("{ name = \"default\", env = \"API_KEY\" }");
        parse(&text, &secrets(registry))
    }

    fn errors(registry: &str) -> String {
        load(registry).unwrap_err().to_string()
    }

    fn entry(name: &str, key: &str, fields: &str) -> String {
        format!(
            "{{ name = \"{name}\", sha256 = \"{}\"{fields} }}",
            sha256_hex(key)
        )
    }

    fn registry(entries: &[String]) -> String {
        format!("keys = [\n  {},\n]\n", entries.join(",\n  "))
    }

    #[test]
    fn registry_keys_are_read_with_their_digests_and_policies() {
        let text = registry(&[
            entry("app", APP, ""),
            entry(
                "batch",
                OTHER,
                ", max_concurrent = 2, weight = 3, not_after = \"2030-01-01T00:00:00Z\", allow = [{ methods = [\"POST\"], path_prefix = \"/v1/\" }]",
            ),
        ]);
        let c = load(&text).unwrap();
        let r = c.auth.registry.as_ref().unwrap();
        assert_eq!(r.path, Path::new(REGISTRY));
        let names: Vec<&str> = r.keys.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["app", "batch"]);
        let app_digest: [u8; 32] = Sha256::digest(APP.as_bytes()).into();
        assert_eq!(r.keys[0].digest, app_digest);
        assert_eq!(r.keys[0].origin, "registry /reg/keys.toml:2");
        let batch = &r.keys[1].policy;
        assert_eq!(batch.max_concurrent, Some(2));
        assert_eq!(batch.weight, 3);
        assert!(batch.not_after.is_some());
        assert_eq!(batch.allow[0].to_string(), "POST below /v1/");
        let live = LiveKeys::new(&c.auth);
        let all: Vec<&str> = live.digests().map(|(name, _, _)| name).collect();
        assert_eq!(all, ["default", "app", "batch"]);
    }

    #[test]
    fn never_a_secret_value_in_a_config_error_a_wrong_sha256_names_its_line_and_keygen() {
        let good = sha256_hex(APP);
        for (value, why) in [
            (good.to_uppercase(), "has characters other than 0-9 and a-f"),
            (good[..63].to_owned(), "has 63 characters instead of 64"),
            // The key itself pasted where its digest belongs: never echoed.
            (
                "kg-pasted-key-instead-of-its-digest-0123456".to_owned(),
                "has 43 characters instead of 64",
            ),
            (format!("{}zz", &good[..62]), "has characters other than"),
        ] {
            let text = format!(
                "keys = [\n  {},\n  {{ name = \"app\", sha256 = \"{value}\" }},\n]\n",
                entry("first", OTHER, "")
            );
            let e = errors(&text);
            assert!(
                e.starts_with(&format!(
                    "/reg/keys.toml:3:3: keys (name = \"app\"): sha256 {why}"
                )),
                "{value}: {e}"
            );
            assert!(
                e.contains("64 lower-case hex characters")
                    && e.contains("`keygate keygen --name app`"),
                "{e}"
            );
            assert!(!e.contains(&value), "{e}");
        }
    }

    #[test]
    fn an_entry_needs_sha256_and_takes_no_value_source() {
        for (fields, expected) in [
            ("", "needs sha256 = \"<64 lower-case hex characters>\""),
            (", env = \"APP_KEY\"", "env has no place in the registry"),
            (", file = \"/run/k\"", "file has no place in the registry"),
            (
                ", optional = false",
                "optional has no place in the registry",
            ),
        ] {
            let sha = if fields.is_empty() {
                String::new()
            } else {
                format!(", sha256 = \"{}\"", sha256_hex(APP))
            };
            let e = errors(&format!("keys = [{{ name = \"app\"{sha}{fields} }}]\n"));
            assert!(
                e.starts_with("/reg/keys.toml:1:9: keys (name = \"app\"): "),
                "{fields}: {e}"
            );
            assert!(e.contains(expected), "{fields}: {e}");
            assert!(e.contains("`keygate keygen --name app`"), "{e}");
        }
    }

    #[test]
    fn unknown_fields_in_the_registry_are_errors_with_their_line() {
        let e = errors(&format!(
            "keys = [\n  {},\n  {{ name = \"b\", sha256 = \"{}\", modle = \"x\" }},\n]\n",
            entry("a", APP, ""),
            sha256_hex(OTHER)
        ));
        assert!(e.starts_with("/reg/keys.toml:3:"), "{e}");
        assert!(e.contains("unknown key `modle`"), "{e}");
        let e = errors(&format!("key = [{}]\n", entry("a", APP, "")));
        assert!(
            e.starts_with("/reg/keys.toml:1:1: unknown key `key`"),
            "{e}"
        );
    }

    #[test]
    fn names_are_unique_across_the_config_and_the_registry() {
        let e = errors(&registry(&[entry("default", APP, "")]));
        assert!(
            e.starts_with("/reg/keys.toml:2:3: keys (name = \"default\"): the name is taken by a key in the config file's [auth] keys"),
            "{e}"
        );
        let e = errors(&registry(&[entry("app", APP, ""), entry("app", OTHER, "")]));
        assert!(
            e.starts_with("/reg/keys.toml:3:3: keys (name = \"app\"): this name is used twice"),
            "{e}"
        );
        // An optional key that is not set keeps its name.
        let text = main_config(
            "{ name = \"default\", env = \"API_KEY\" }, { name = \"next\", env = \"NEXT\", optional = true }",
        );
        let e = parse(&text, &secrets(&registry(&[entry("next", APP, "")])))
            .unwrap_err()
            .to_string();
        assert!(e.contains("(name = \"next\"): the name is taken"), "{e}");
    }

    #[test]
    fn a_digest_used_twice_is_refused_by_names_and_lines_only() {
        let e = errors(&registry(&[entry("a", APP, ""), entry("b", APP, "")]));
        assert!(
            e.starts_with("/reg/keys.toml:3:3: keys (name = \"b\"): keys \"a\" (registry /reg/keys.toml:2) and \"b\" (registry /reg/keys.toml:3) have the same value"),
            "{e}"
        );
        let e = errors(&registry(&[entry("a", OTHER, ""), entry("b", KEY, "")]));
        assert!(
            e.starts_with("/reg/keys.toml:3:3: keys (name = \"b\"): keys \"default\" (environment variable API_KEY) and \"b\" (registry /reg/keys.toml:3) have the same value"),
            "{e}"
        );
        assert!(!e.contains(&sha256_hex(KEY)) && !e.contains(KEY), "{e}");
    }

    #[test]
    fn policy_fields_are_checked_as_in_the_config() {
        for (fields, expected) in [
            (", max_concurrent = 0", "max_concurrent = 0 admits nothing"),
            (", allow = []", "lets the key do nothing"),
            (
                ", routes = [\"admin\"]",
                "only applies with a server preset",
            ),
            (
                ", weight = 0",
                "weight must be a whole number from 1 to 1000",
            ),
            (", not_after = \"2030-01-01\"", "RFC 3339"),
        ] {
            let e = errors(&format!("keys = [{}]\n", entry("app", APP, fields)));
            assert!(
                e.starts_with("/reg/keys.toml:1:9: keys (name = \"app\"): "),
                "{fields}: {e}"
            );
            assert!(e.contains(expected), "{fields}: {e}");
        }
    }

    #[test]
    fn config_and_registry_problems_are_reported_together() {
        let text = "[server]\nlisten = \"nowhere\"\n[auth]\nkeys = [{ name = \"default\", env = \"API_KEY\" }]\nregistry = \"/reg/keys.toml\"\n";
        let e = parse(text, &secrets("keys = [{ name = \"app\" }]\n"))
            .unwrap_err()
            .to_string();
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), 2, "{e}");
        assert!(
            lines[0].starts_with("test.toml:2:10: [server] listen"),
            "{e}"
        );
        assert!(
            lines[1].starts_with("/reg/keys.toml:1:9: keys (name = \"app\"): needs sha256"),
            "{e}"
        );
    }

    #[test]
    fn sha256_belongs_in_the_registry_not_the_config() {
        let text = format!(
            "[auth]\nkeys = [{{ name = \"default\", sha256 = \"{}\" }}]\n",
            sha256_hex(KEY)
        );
        let e = parse(&text, &MapSecrets::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("test.toml:2:9: [auth] keys (name = \"default\"): sha256 belongs in the key registry"),
            "{e}"
        );
    }

    #[test]
    fn a_registry_may_hold_every_key_but_something_must_admit() {
        let text = main_config("");
        let with_registry = |registry: &str| parse(&text, &secrets(registry));
        let c = with_registry(&registry(&[entry("app", APP, "")])).unwrap();
        assert!(c.auth.keys.is_empty());
        let e = with_registry("keys = []\n").unwrap_err().to_string();
        assert!(
            e.contains("the registry holds no key and [auth] keys has none"),
            "{e}"
        );
        let e = parse(&text, &MapSecrets::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "test.toml:3:12: [auth] registry: cannot read the key registry /reg/keys.toml"
            ),
            "{e}"
        );
    }

    #[test]
    fn a_reload_rereads_the_registry_and_keeps_the_keys_on_any_problem() {
        let c = load(&registry(&[entry("app", APP, "")])).unwrap();
        let live = LiveKeys::new(&c.auth);
        let changed = secrets(&registry(&[
            entry("app", APP, ", max_concurrent = 3"),
            entry("new", OTHER, ""),
        ]));
        let reloaded = live.reload(&[], &changed).unwrap();
        let keys: Vec<(&str, Option<usize>)> = reloaded
            .digests()
            .map(|(name, _, policy)| (name, policy.max_concurrent))
            .collect();
        assert_eq!(keys, [("default", None), ("app", Some(3)), ("new", None)]);
        for (text, expected) in [
            (
                format!("keys = [\n  {}\n]\n", entry("app", KEY, "")),
                "/reg/keys.toml:2:3: keys (name = \"app\"): keys \"default\" (environment variable API_KEY) and \"app\"",
            ),
            (
                "keys = [\n  { name = \"app\", sha256 = \"abc\" },\n  { name = \"b\" },\n]\n".to_owned(),
                "/reg/keys.toml:2:3: keys (name = \"app\"): sha256 has 3 characters instead of 64; it must be 64 lower-case hex characters, the SHA-256 of the key. `keygate keygen --name app` prints a new key and its entry; /reg/keys.toml:3:3: keys (name = \"b\"): needs sha256",
            ),
            ("keys = [\n".to_owned(), "/reg/keys.toml:"),
        ] {
            let e = live.reload(&[], &secrets(&text)).unwrap_err();
            assert!(e.starts_with(expected), "{e}");
        }
        let e = live.reload(&[], &MapSecrets::default()).unwrap_err();
        assert!(
            e.starts_with("cannot read the key registry /reg/keys.toml"),
            "{e}"
        );
    }

    #[test]
    fn a_reload_that_leaves_no_key_keeps_the_keys() {
        let text = main_config("");
        let c = parse(&text, &secrets(&registry(&[entry("app", APP, "")]))).unwrap();
        let e = LiveKeys::new(&c.auth)
            .reload(&[], &secrets("keys = []\n"))
            .unwrap_err();
        assert_eq!(e, "no key would be left to admit anyone");
    }

    #[test]
    fn a_keygen_entry_is_a_registry_entry_for_the_key() {
        let line = registry_entry("app", APP).unwrap();
        assert_eq!(
            line,
            format!("{{ name = \"app\", sha256 = \"{}\" }},", sha256_hex(APP))
        );
        let c = load(&format!("keys = [\n  {line}\n]\n")).unwrap();
        let expected: [u8; 32] = Sha256::digest(APP.as_bytes()).into();
        assert_eq!(c.auth.registry.unwrap().keys[0].digest, expected);
        assert!(registry_entry("two words", APP).is_err());
        assert!(registry_entry("", APP).is_err());
    }

    #[test]
    fn the_summary_shows_registry_names_and_policies_never_digests() {
        let c = load(&registry(&[
            entry("app", APP, ""),
            entry("batch", OTHER, ", max_concurrent = 2"),
        ]))
        .unwrap();
        let summary = c.summary();
        assert!(
            summary.contains(
                "key registry:    /reg/keys.toml: app, batch; re-read on SIGHUP and when it changes"
            ),
            "{summary}"
        );
        assert!(
            summary.contains("key batch:       max_concurrent 2\n"),
            "{summary}"
        );
        for key in [APP, OTHER] {
            assert!(!summary.contains(&sha256_hex(key)[..8]), "{summary}");
        }
        let debug = format!("{c:?}");
        assert!(!debug.contains(&sha256_hex(APP)[..8]), "{debug}");
        assert!(!debug.contains(&format!("{:?}", &Sha256::digest(APP.as_bytes())[..4])));
    }
}
