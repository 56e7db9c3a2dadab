//! The real `keygate` binary as an operator runs it: a config file on disk, secrets in the
//! environment, logs on stdout, stopped with a signal.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{CI_KEY, DEADLINE, KEY, SHARED_SECRET, UPSTREAM_TOKEN};

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("keygate-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The environment a `config_text` config reads its secrets from.
pub const ENV: [(&str, &str); 4] = [
    ("API_KEY", KEY),
    ("CI_KEY", CI_KEY),
    ("SHARED_SECRET", SHARED_SECRET),
    ("UPSTREAM_API_KEY", UPSTREAM_TOKEN),
];

pub fn keygate() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keygate"));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    command
}

/// Runs `keygate ARGS` to completion with `env`; returns (exit status, stdout, stderr).
pub fn run_to_end(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let output = keygate()
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A running keygate process whose output is captured line by line.
pub struct Running {
    child: Child,
    pub addr: SocketAddr,
    output: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Starts `keygate --config CONFIG --listen 127.0.0.1:0` and waits for the log line that
    /// tells which port it got.
    pub fn start(config: &std::path::Path, env: &[(&str, &str)]) -> Self {
        Self::spawn(keygate(), config, env)
    }

    /// Like [`Running::start`], with at most `fds` open file descriptors (`ulimit -n`).
    pub fn start_with_fd_limit(config: &std::path::Path, env: &[(&str, &str)], fds: u32) -> Self {
        let mut command = Command::new("bash");
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .arg("-c")
            .arg(format!("ulimit -n {fds} && exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_keygate"));
        Self::spawn(command, config, env)
    }

    fn spawn(mut command: Command, config: &std::path::Path, env: &[(&str, &str)]) -> Self {
        let mut child = command
            .arg("--config")
            .arg(config)
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let streams = [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ];
        let readers = streams
            .into_iter()
            .map(|stream| {
                let output = output.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(stream).lines().map_while(Result::ok) {
                        output.lock().unwrap().push(line);
                    }
                })
            })
            .collect();
        let mut running = Self {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            output,
            readers,
        };
        let line = running.wait_for_line("accepting connections");
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        running.addr = event["listen"].as_str().unwrap().parse().unwrap();
        running
    }

    /// Waits for a captured line containing `needle`, or panics at the deadline.
    pub fn wait_for_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(line) = self
                .output
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return line.clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "keygate exited ({status}) before logging {needle:?}:\n{}",
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in keygate's output:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Sends SIGTERM and waits for the exit, at most the deadline.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        self.signal("TERM");
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The readers end at the pipes' EOF, having captured every line.
                for reader in self.readers.drain(..) {
                    reader.join().unwrap();
                }
                return (status, self.output());
            }
            assert!(
                Instant::now() < deadline,
                "keygate did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running keygate whose stdout and stderr are pipes the test holds open and, once the
/// start-up lines have told it the addresses, never reads: a log reader that stalled.
pub struct Unread {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stdout: Option<BufReader<std::process::ChildStdout>>,
    _stderr: std::process::ChildStderr,
    /// Lines read since [`Unread::read_again`].
    read: Arc<Mutex<Vec<String>>>,
}

impl Unread {
    /// Starts `keygate --config CONFIG --listen 127.0.0.1:0`; the config must log at `info`
    /// and have an `[admin]` listener.
    pub fn start(config: &std::path::Path, env: &[(&str, &str)]) -> Self {
        let mut child = keygate()
            .arg("--config")
            .arg(config)
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut stdout = BufReader::new(stdout);
            let (mut addr, mut admin) = (None, None);
            let mut line = String::new();
            while addr.is_none() || admin.is_none() {
                line.clear();
                if stdout.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                let listen = event["listen"].as_str().and_then(|a| a.parse().ok());
                match event["message"].as_str() {
                    Some("accepting connections") => addr = listen,
                    Some(m) if m.starts_with("admin endpoints") => admin = listen,
                    _ => {}
                }
            }
            let _ = tx.send((addr.unwrap(), admin.unwrap(), stdout));
        });
        let (addr, admin, stdout) = rx
            .recv_timeout(DEADLINE)
            .expect("keygate logs its proxy and admin addresses");
        Self {
            child,
            addr,
            admin,
            stdout: Some(stdout),
            _stderr: stderr,
            read: Arc::default(),
        }
    }

    /// The reader comes back: stdout is read from now on (stderr stays unread).
    pub fn read_again(&mut self) {
        let stdout = self.stdout.take().expect("stdout is not read yet");
        let read = self.read.clone();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                read.lock().unwrap().push(line);
            }
        });
    }

    /// Waits for a line read since [`Unread::read_again`] that contains `needle`; returns
    /// every such line read by then.
    pub fn wait_for_lines(&self, needle: &str) -> Vec<String> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let found: Vec<String> = self
                .read
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(needle))
                .cloned()
                .collect();
            if !found.is_empty() {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in keygate's output once read again"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM and returns the exit status, or `None` if the process is still running
    /// at `within`; the pipes stay unread throughout.
    pub fn terminate_within(&mut self, within: Duration) -> Option<ExitStatus> {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Unread {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// An [`Unread`] keygate (an admin listener, logging at `info`) in front of a recording
/// upstream, and the runtime that serves the upstream and the test's clients: the set-up of
/// every test of a log reader that stalled.
pub struct StalledLog {
    pub runtime: tokio::runtime::Runtime,
    pub keygate: Unread,
    _upstream: super::Upstream,
    _dir: TempDir,
}

/// Starts a [`StalledLog`]; `tag` names its temporary directory.
pub fn stalled_log_keygate(tag: &str) -> StalledLog {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(super::start_upstream());
    let dir = TempDir::new(tag);
    let config = super::TestConfig::new(upstream.addr)
        .admin()
        .log_level("info")
        .text();
    let keygate = Unread::start(&dir.write("keygate.toml", &config), &ENV);
    StalledLog {
        runtime,
        keygate,
        _upstream: upstream,
        _dir: dir,
    }
}
