//! A real `redis-server` of the test's own on a free loopback port: no persistence, stopped
//! by its pid when dropped, and killable, stoppable and restartable on the same port to play
//! an outage.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::process::TempDir;
use super::DEADLINE;

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    /// The TLS port of one started by [`Self::start_tls`].
    pub tls_port: Option<u16>,
    dir: TempDir,
    tls_args: Vec<String>,
}

impl RedisServer {
    /// Starts one on a free port, trying another port if one is taken in the meantime.
    pub async fn start() -> Self {
        Self::start_with(TempDir::new("redis"), false).await
    }

    /// One that also serves TLS with `cert_pem`/`key_pem` on [`Self::tls_port`].
    pub async fn start_tls(cert_pem: &str, key_pem: &str, ca_pem: &str) -> Self {
        let dir = TempDir::new("redis");
        dir.write("cert.pem", cert_pem);
        dir.write("key.pem", key_pem);
        dir.write("ca.pem", ca_pem);
        Self::start_with(dir, true).await
    }

    async fn start_with(dir: TempDir, tls: bool) -> Self {
        for _ in 0..20 {
            let port = free_port();
            let (tls_port, tls_args) = if tls {
                let tls_port = free_port();
                let file = |name: &str| dir.0.join(name).display().to_string();
                let args = [
                    "--tls-port".to_owned(),
                    tls_port.to_string(),
                    "--tls-cert-file".to_owned(),
                    file("cert.pem"),
                    "--tls-key-file".to_owned(),
                    file("key.pem"),
                    "--tls-ca-cert-file".to_owned(),
                    file("ca.pem"),
                    "--tls-auth-clients".to_owned(),
                    "no".to_owned(),
                ];
                (Some(tls_port), args.to_vec())
            } else {
                (None, Vec::new())
            };
            if let Some(child) = spawn(port, &dir, &tls_args).await {
                return Self {
                    child: Some(child),
                    port,
                    tls_port,
                    dir,
                    tls_args,
                };
            }
        }
        panic!("redis-server did not start on any of 20 free ports");
    }

    /// Starts one on `port`, e.g. one a client was given before Redis was up; `None` if the
    /// port is taken.
    pub async fn start_on(port: u16) -> Option<Self> {
        let dir = TempDir::new("redis");
        let child = spawn(port, &dir, &[]).await?;
        Some(Self {
            child: Some(child),
            port,
            tls_port: None,
            dir,
            tls_args: Vec::new(),
        })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .expect("redis-server is not running")
            .id()
    }

    /// SIGKILL, as a crash or an OOM kill would end it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: it keeps its socket and answers nothing, as a hung server does.
    pub fn freeze(&self) {
        signal(self.pid(), "-STOP");
    }

    pub fn thaw(&self) {
        signal(self.pid(), "-CONT");
    }

    /// Starts it again on the same port, empty, after [`Self::kill`].
    pub async fn restart(&mut self) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while tokio::time::Instant::now() < deadline {
            if let Some(child) = spawn(self.port, &self.dir, &self.tls_args).await {
                self.child = Some(child);
                return;
            }
        }
        panic!("redis-server did not start again on port {}", self.port);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            signal(child.id(), "-CONT");
        }
        self.kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("no free port")
        .port()
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill(1) not found");
    assert!(status.success(), "kill {sig} {pid} failed");
}

/// Spawns `redis-server` on `port` and waits for its PONG; `None` if it exits first (a
/// port was taken).
async fn spawn(port: u16, dir: &TempDir, extra: &[String]) -> Option<Child> {
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--dir".as_ref(), dir.0.as_os_str()])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server not found: apt-get install redis-server");
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while tokio::time::Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return None;
        }
        if pong(addr).await {
            return Some(child);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

async fn pong(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return false;
    };
    if stream.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut reply)).await,
        Ok(Ok(_)) if &reply == b"+PONG\r\n"
    )
}
