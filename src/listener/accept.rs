//! The proxy listener's accept loop: a connection is taken from the listen backlog only under
//! `max_connections` (or the few over it that get one answer, see [`OVERFLOW_CONNECTIONS`]),
//! and one at a time, each followed by the connections' turn, so the backlog becomes open
//! descriptors no faster than keygate serves them. [`run`](crate::listener::server::run)
//! spawns it; each connection then goes to the server's `serve` in a task of its own.

use std::future::Future;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::forward::rewrite::Peer;
use crate::listener::server::{ACCEPT_BACKOFF, OVERFLOW_CONNECTIONS};

/// Accepts connections and serves each with `serve` until `draining` turns true, then closes
/// the listener and hands back the tasks of the connections still open.
///
/// To be spawned, not awaited in the caller's future: that may run outside the runtime's
/// workers (the binary's `block_on` runs on a thread of its own), where the yield after each
/// accept gives the connections no turn. Measured so, with clients that send a request and
/// close at once, keygate held up to 1,536 accepted connections its workers had not yet
/// polled once.
pub(super) async fn accept<S, F>(
    listener: TcpListener,
    max_connections: usize,
    mut draining: watch::Receiver<bool>,
    serve: S,
) -> JoinSet<()>
where
    S: Fn(TcpStream, Peer, watch::Receiver<bool>) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(max_connections));
    let overflow = Arc::new(Semaphore::new(OVERFLOW_CONNECTIONS));
    // Every connection task lives in this set: finished ones are reaped as the loop goes, and
    // those still open when the grace expires are aborted, so nothing outlives `run`.
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (permit, over_capacity) = tokio::select! {
            biased;
            () = drained(&mut draining) => break,
            permit = limit.clone().acquire_owned() => (permit, false),
            permit = overflow.clone().acquire_owned() => (permit, true),
        };
        let Ok(permit) = permit else { break };
        let (stream, peer) = tokio::select! {
            biased;
            () = drained(&mut draining) => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "accept failed; retrying shortly");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        if over_capacity {
            debug!(%peer, "at max_connections: serving only the probe on this connection");
        }
        let served = serve(stream, Peer::new(peer, over_capacity), draining.clone());
        connections.spawn(async move {
            served.await;
            drop(permit);
        });
        // One accept, then the connections' turn: accepting a whole burst first would turn
        // the listen backlog into open descriptors faster than they are served or closed.
        tokio::task::yield_now().await;
    }
    connections
}

/// Completes when keygate drains.
async fn drained(draining: &mut watch::Receiver<bool>) {
    let _ = draining.wait_for(|&draining| draining).await;
}
