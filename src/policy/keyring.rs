//! The keys in force, as the key check reads them, and their reloads: the [`KeySet`] built
//! from the config's keys and the key registry, rebuilt when SIGHUP arrives or a key file or
//! the registry changes. A new set replaces the old one whole, so a request sees the keys of
//! one moment and keeps the key it was admitted with; each key's [`Policy`] is renewed by
//! name, so what the key has in flight and the expiry notices it was given carry over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use arc_swap::{ArcSwap, Guard};

use crate::config::secrets::SecretSource;
use crate::config::{Auth, FileKey, LiveKeys, WatchedFiles};
use crate::policy::auth::KeySet;
use crate::policy::scope::Policy;

pub struct Keyring {
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
    /// The newest policy of each key name, for as long as anything holds it: the key set,
    /// or a request admitted before its key was removed, which still holds its slot.
    policies: HashMap<String, Weak<Policy>>,
}

impl Keyring {
    pub fn new(auth: &Auth) -> Self {
        let live = LiveKeys::new(auth);
        let mut policies = HashMap::new();
        let keys = build(&live, &mut policies);
        let files = auth.file_keys.iter().map(|f| (f.path.clone(), f.stamp.clone()));
        let registry = auth.registry.iter().map(|r| (r.path.clone(), r.stamp.clone()));
        Self {
            keys: ArcSwap::from_pointee(keys),
            state: Mutex::new(State { live, policies }),
            file_keys: auth.file_keys.clone(),
            watched: WatchedFiles::new(files.chain(registry).collect()),
        }
    }

    /// The keys in force.
    pub fn load(&self) -> Guard<Arc<KeySet>> {
        self.keys.load()
    }

    /// The keys in force, to hold on to.
    pub fn load_full(&self) -> Arc<KeySet> {
        self.keys.load_full()
    }

    /// Whether a key file or the registry changed since the last look.
    pub fn changed(&self) -> bool {
        self.watched.changed()
    }

    /// Re-reads the key files and the registry, and puts the new set in force; on any
    /// problem, the keys in force stay and the error says why. Requests in flight keep the
    /// keys they were admitted with either way.
    pub fn reload(&self, secrets: &dyn SecretSource) -> Result<Arc<KeySet>, String> {
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
fn build(live: &LiveKeys, policies: &mut HashMap<String, Weak<Policy>>) -> KeySet {
    policies.retain(|_, policy| policy.strong_count() > 0);
    KeySet::new(live.digests().map(|(name, digest, spec)| {
        let policy = Arc::new(match policies.get(name).and_then(Weak::upgrade) {
            Some(before) => before.renewed(spec.clone()),
            None => Policy::new(spec.clone()),
        });
        policies.insert(name.to_owned(), Arc::downgrade(&policy));
        (name, digest, policy)
    }))
}
