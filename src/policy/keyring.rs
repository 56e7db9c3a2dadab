//! The keys in force, as the key check reads them, and their reloads: the [`KeySet`] built
//! from the config's keys and the key registry, rebuilt when SIGHUP arrives or a key file or
//! the registry changes. A new set replaces the old one whole, so a request sees the keys of
//! one moment and keeps the key it was admitted with; each key's [`Policy`] is renewed by
//! name, so the expiry notices it was given carry over (its slots and rates are kept by name
//! in the limiter).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::{ArcSwap, Guard};

use crate::config::secrets::SecretSource;
use crate::config::{Auth, FileKey, LiveKeys, WatchedFiles};
use crate::policy::auth::KeySet;
use crate::policy::scope::Policy;

pub(crate) struct Keyring {
    /// Swapped whole by a reload; a request holds the set it started with.
    keys: ArcSwap<KeySet>,
    /// What `keys` was built from: a reload starts from it.
    state: Mutex<State>,
    /// Keys read from files, re-read by every reload.
    file_keys: Vec<FileKey>,
    /// The key files and the registry, watched for changes; see [`Keyring::changed`].
    watched: WatchedFiles,
}

struct State {
    live: LiveKeys,
    /// The newest policy of each key in force, and of each removed key that still has
    /// requests in flight: a key added back then finds them counted.
    policies: HashMap<String, Arc<Policy>>,
}

impl Keyring {
    pub(crate) fn new(auth: &Auth) -> Self {
        let live = LiveKeys::new(auth);
        let mut policies = HashMap::new();
        let keys = build(&live, &mut policies);
        let files = auth
            .file_keys
            .iter()
            .map(|f| (f.path.clone(), f.stamp.clone()));
        let registry = auth
            .registry
            .iter()
            .map(|r| (r.path.clone(), r.stamp.clone()));
        Self {
            keys: ArcSwap::from_pointee(keys),
            state: Mutex::new(State { live, policies }),
            file_keys: auth.file_keys.clone(),
            watched: WatchedFiles::new(files.chain(registry).collect()),
        }
    }

    /// The keys in force.
    pub(crate) fn load(&self) -> Guard<Arc<KeySet>> {
        self.keys.load()
    }

    /// The keys in force, to hold on to.
    pub(crate) fn load_full(&self) -> Arc<KeySet> {
        self.keys.load_full()
    }

    /// Whether a key file or the registry changed since the last look.
    pub(crate) fn changed(&self) -> bool {
        self.watched.changed()
    }

    /// Re-reads the key files and the registry, and puts the new set in force; on any
    /// problem, the keys in force stay and the error says why. Requests in flight keep the
    /// keys they were admitted with either way.
    pub(crate) fn reload(&self, secrets: &dyn SecretSource) -> Result<Arc<KeySet>, String> {
        // What this reload reads counts as seen, so a change is not reloaded twice.
        self.watched.changed();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let live = state.live.reload(&self.file_keys, secrets)?;
        let keys = Arc::new(build(&live, &mut state.policies));
        self.keys.store(keys.clone());
        state.live = live;
        Ok(keys)
    }
}

/// The key set of `live`, each key's policy renewed from the one its name last had.
fn build(live: &LiveKeys, policies: &mut HashMap<String, Arc<Policy>>) -> KeySet {
    let keys = KeySet::from_digests(live.digests().map(|(name, digest, spec)| {
        let policy = Arc::new(match policies.get(name) {
            Some(before) => before.renewed(spec.clone()),
            None => Policy::new(spec.clone()),
        });
        policies.insert(name.to_owned(), policy.clone());
        (name, digest, policy)
    }));
    let names: HashSet<&str> = keys.names().collect();
    policies.retain(|name, _| names.contains(name.as_str()));
    keys
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use http::Method;

    use super::*;
    use crate::config::secrets::MapSecrets;
    use crate::config::{sha256_hex, Config, Overrides};

    const KEY: &str = "config-key-0123456789abcdef";
    const APP: &str = "app-key-0123456789abcdef";
    const NEW: &str = "new-key-0123456789abcdef";

    fn secrets(registry: &str) -> MapSecrets {
        MapSecrets::default()
            .with_env("API_KEY", KEY)
            .with_file("/reg/keys.toml", registry)
    }

    fn entry(name: &str, key: &str, fields: &str) -> String {
        format!(
            "{{ name = \"{name}\", sha256 = \"{}\"{fields} }}",
            sha256_hex(key)
        )
    }

    fn keyring(registry: &str) -> Keyring {
        let text = "[auth]\nkeys = [{ name = \"default\", env = \"API_KEY\" }]\nregistry = \"/reg/keys.toml\"\n";
        let config = Config::parse(
            Path::new("test.toml"),
            text,
            &Overrides::default(),
            &secrets(registry),
        )
        .unwrap();
        Keyring::new(&config.auth)
    }

    #[test]
    fn a_key_the_registry_adds_gets_its_own_policy() {
        let keyring = keyring(&format!("keys = [{}]", entry("app", APP, "")));
        assert!(keyring.load().verify(NEW.as_bytes()).is_none());
        let added = format!(
            "keys = [{}, {}]",
            entry("app", APP, ""),
            entry(
                "new",
                NEW,
                ", max_concurrent = 1, allow = [{ methods = [\"GET\"], path = \"/v1/models\" }]"
            )
        );
        keyring.reload(&secrets(&added)).unwrap();
        let new = keyring.load().verify(NEW.as_bytes()).unwrap();
        assert_eq!(&*new.name, "new");
        assert!(new.policy.permits(&Method::GET, "/v1/models", None));
        assert!(!new
            .policy
            .permits(&Method::POST, "/v1/chat/completions", None));
        assert_eq!(new.policy.max_concurrent, Some(1));
    }

    #[test]
    fn a_removed_key_is_refused_and_a_bad_registry_keeps_the_keys() {
        let keyring = keyring(&format!("keys = [{}]", entry("app", APP, "")));
        let admitted = keyring.load().verify(APP.as_bytes()).unwrap();
        assert!(keyring
            .reload(&secrets("keys = [{ name = \"app\" }]"))
            .is_err());
        assert!(keyring.load().verify(APP.as_bytes()).is_some());
        keyring.reload(&secrets("keys = []")).unwrap();
        assert!(keyring.load().verify(APP.as_bytes()).is_none());
        assert!(keyring.load().verify(KEY.as_bytes()).is_some());
        assert_eq!(
            &*admitted.name, "app",
            "a request admitted before keeps its key"
        );
    }
}
