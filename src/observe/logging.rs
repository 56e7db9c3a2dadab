//! Log output. Installs the tracing subscriber (JSON, one object per line, or text; filtered
//! by `[log] level`, a `RUST_LOG`-style filter) and owns the one way out to stdout: a bounded
//! queue emptied by a writer thread of its own. Diagnostics and the access lines that
//! `access` formats itself both go through it, so no request, probe or signal handler ever
//! waits on stdout.
//!
//! When the queue is full (stdout is read too slowly, or not at all), lines are dropped and
//! counted in `keygate_log_lines_dropped_total`; once the writer has caught up, one warning
//! says how many were lost. At exit, [`finish`] gives the writer a bounded time to empty the
//! queue.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, LazyLock, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tracing_subscriber::EnvFilter;

use crate::config::{Log, LogFormat};

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Bytes of log waiting for stdout, beyond which new lines are dropped: about 13,000 access
/// lines, a quarter of a second at the fastest rate measured and well over a second at
/// ordinary ones. Memory is spent only while the reader lags.
pub(crate) const QUEUE_BYTES: usize = 4 * 1024 * 1024;

/// How long [`finish`] waits for the queue to be written at exit.
pub const FINISH_WITHIN: Duration = Duration::from_secs(2);

/// The format chosen at start-up; JSON before `init` runs.
pub(crate) fn format() -> LogFormat {
    FORMAT.get().copied().unwrap_or(LogFormat::Json)
}

/// Starts the writer thread and installs the global subscriber. A second call (tests)
/// leaves the first in place.
pub fn init(log: &Log) -> io::Result<()> {
    if FORMAT.set(log.format).is_err() {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("keygate-log".into())
        .spawn(write_queue)?;
    QUEUE.running.store(true, Ordering::Release);
    let filter = EnvFilter::builder().parse_lossy(&log.level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| Queued)
        .with_ansi(io::IsTerminal::is_terminal(&io::stdout()));
    let _already_set = match log.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
    Ok(())
}

/// Hands whole lines (one or many, each ending in a newline) to the writer. Never waits on
/// stdout: if the queue is full they are dropped and counted. Before `init`, nothing is
/// written.
pub(crate) fn write(lines: Vec<u8>) {
    if lines.is_empty() || !QUEUE.running.load(Ordering::Acquire) {
        return;
    }
    let mut state = QUEUE.lock();
    if state.bytes + lines.len() > QUEUE_BYTES {
        drop(state);
        dropped(&lines);
        return;
    }
    state.bytes += lines.len();
    state.waiting.push_back(lines);
    drop(state);
    QUEUE.ready.notify_one();
}

/// Waits until every line handed over so far is written, or `within` has passed: at exit,
/// a stalled reader costs the lines still queued, never the exit.
pub fn finish(within: Duration) {
    if !QUEUE.running.load(Ordering::Acquire) {
        return;
    }
    let state = QUEUE.lock();
    let _written = QUEUE
        .idle
        .wait_timeout_while(state, within, |state| state.bytes > 0)
        .unwrap_or_else(PoisonError::into_inner);
}

/// The count of log lines dropped since start-up, for `metrics` to serve.
pub(crate) fn dropped_lines() -> Counter {
    DROPPED.clone()
}

/// Lines dropped in this process, however many metrics registries serve the count.
static DROPPED: LazyLock<Counter> = LazyLock::new(Counter::default);

/// Lines dropped since the last warning about them.
static UNREPORTED: AtomicU64 = AtomicU64::new(0);

fn dropped(lines: &[u8]) {
    let n = lines.iter().filter(|&&b| b == b'\n').count().max(1) as u64;
    DROPPED.inc_by(n);
    UNREPORTED.fetch_add(n, Ordering::Relaxed);
}

static QUEUE: Queue = Queue {
    state: Mutex::new(State {
        waiting: VecDeque::new(),
        bytes: 0,
    }),
    ready: Condvar::new(),
    idle: Condvar::new(),
    running: AtomicBool::new(false),
};

struct Queue {
    state: Mutex<State>,
    /// Signalled when lines are queued.
    ready: Condvar,
    /// Signalled when everything handed over has been written.
    idle: Condvar,
    /// Whether the writer thread runs.
    running: AtomicBool,
}

struct State {
    waiting: VecDeque<Vec<u8>>,
    /// Bytes queued or being written: what counts against [`QUEUE_BYTES`].
    bytes: usize,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The writer thread: takes everything queued, writes it to stdout, and only then frees its
/// room in the queue, so that lines stuck in a blocked write still count against the bound.
/// Each piece ends in a newline, so stdout's line buffering passes it straight through: an
/// access batch is one write.
fn write_queue() {
    loop {
        let batch = {
            let state = QUEUE.lock();
            let mut state = QUEUE
                .ready
                .wait_while(state, |state| state.waiting.is_empty())
                .unwrap_or_else(PoisonError::into_inner);
            std::mem::take(&mut state.waiting)
        };
        let mut stdout = io::stdout().lock();
        let mut all_written = true;
        for lines in &batch {
            // A full disk or closed stdout must not take the proxy down: the lines are lost.
            if stdout.write_all(lines).is_err() {
                all_written = false;
                dropped(lines);
            }
        }
        drop(stdout);
        let bytes: usize = batch.iter().map(Vec::len).sum();
        let caught_up = {
            let mut state = QUEUE.lock();
            state.bytes -= bytes;
            state.waiting.is_empty()
        };
        if caught_up {
            QUEUE.idle.notify_all();
        }
        if caught_up && all_written {
            let lost = UNREPORTED.swap(0, Ordering::Relaxed);
            if lost > 0 {
                tracing::warn!(
                    lost,
                    "log lines were dropped because the log output was not read fast enough; keygate_log_lines_dropped_total counts them all"
                );
            }
        }
    }
}

/// A tracing writer that hands each formatted event to the queue.
struct Queued;

impl Write for Queued {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        write(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
