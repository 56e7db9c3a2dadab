//! Fair admission to the upstream under `[upstream] max_in_flight`. A request takes a
//! [`Permit`] from the [`FairQueue`] after its key and scope are checked and before it is
//! sent upstream, and holds it until its response ends, breaks or is dropped. At most
//! `max_in_flight` permits are out at once; the requests beyond them wait in one FIFO queue
//! per key, and each permit given back goes to the waiting request with the smallest virtual
//! start time (start-time fair queuing), so keys share the upstream by their weights and a
//! key with one request waits for about one release, not behind another key's backlog.
//!
//! Why start-time fair queuing and not deficit round-robin: every request costs the same
//! here (its length is unknown when it is admitted), so both give the same long-run shares,
//! but they differ in how long a key that has just become active waits. Round-robin puts it
//! at the end of the round, behind the quantum of every backlogged key (with one batch key
//! of weight 8, up to 8 releases); start-time fair queuing tags it with the current virtual
//! time, at or below every tag already queued, so it goes next. Tagging the new head of a
//! key's queue with `max(virtual time, the key's last finish)` is also what keeps an idle
//! key from banking credit: the virtual time has moved on while it was idle.
//!
//! Nothing is queued while a place is free: taking it is one uncontended lock, and so is
//! giving it back while nobody waits. The queue is drained at shutdown
//! ([`FairQueue::drain`]): the waiting requests are refused at once, the requests in flight
//! keep their permits and finish.

use std::collections::{HashMap, VecDeque};
use std::error::Error;
use std::fmt;
use std::mem;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

/// The virtual time one request of weight 1 takes; weight `w` takes `UNIT / w`. 720720 is a
/// multiple of every weight from 1 to 16, so those shares are exact; larger weights round
/// down, by less than 0.1 % up to weight 720. A `u64` of it lasts 2.5e13 requests.
const UNIT: u64 = 720_720;

/// The admission queue in front of the upstream. Clones share one queue.
#[derive(Debug, Clone)]
pub struct FairQueue {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    max_in_flight: usize,
    /// Permits out, counting those sent to a waiter that has not taken it yet.
    in_flight: usize,
    /// Requests queued over all keys. Nonzero only while `in_flight == max_in_flight`.
    waiting: usize,
    draining: bool,
    /// The start tag of the request last let out of a queue.
    virtual_time: u64,
    /// Arrival order, to break ties between equal start tags first come, first served.
    arrivals: u64,
    /// Keys with requests waiting or whose last finish tag is ahead of the virtual time;
    /// any other key is in the same position as one never seen.
    lanes: HashMap<Arc<str>, Lane>,
}

#[derive(Debug, Default)]
struct Lane {
    waiters: VecDeque<Waiter>,
    /// The finish tag of the key's last request let out of its queue.
    finish: u64,
}

#[derive(Debug)]
struct Waiter {
    arrival: u64,
    weight: u32,
    /// Dropped without a permit when the queue drains.
    grant: oneshot::Sender<Permit>,
}

/// A place in flight to the upstream, given back when dropped. A permit sent to a waiter
/// that is gone is dropped with its channel, which gives it back, so no place leaks.
#[derive(Debug)]
#[must_use = "the place is given back as soon as the permit is dropped"]
pub struct Permit {
    /// `None` once the place has been handed on without being given back.
    shared: Option<Arc<Shared>>,
    waited: Duration,
}

/// Why a request was not admitted. Both map to 503 with `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No place came free within the queue timeout.
    Timeout { waited: Duration },
    /// The queue is draining for shutdown and this request would have had to wait.
    Draining { waited: Duration },
}

/// The queue at one instant, for the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub max_in_flight: usize,
    pub in_flight: usize,
    pub waiting: usize,
    /// The keys with requests waiting and how many, in no particular order. Only keys that
    /// were passed to [`FairQueue::admit`] appear, so the set is bounded by the key set.
    pub queued: Vec<(Arc<str>, usize)>,
}

impl FairQueue {
    /// A queue letting `max_in_flight` requests through at once; 0 counts as 1, since a
    /// queue that never admits would only turn every request into a timeout.
    pub fn new(max_in_flight: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    max_in_flight: max_in_flight.max(1),
                    in_flight: 0,
                    waiting: 0,
                    draining: false,
                    virtual_time: 0,
                    arrivals: 0,
                    lanes: HashMap::new(),
                }),
            }),
        }
    }

    /// Waits for a place in flight for a request of `key`, whose share of the upstream is
    /// `weight` (0 counts as 1). Admits at once while a place is free, otherwise queues the
    /// request behind the key's earlier ones and refuses it after `timeout`.
    ///
    /// Cancel safe: dropping the future takes the request out of its queue at once, and a
    /// permit granted to it in the meantime goes to the next waiter.
    pub async fn admit(
        &self,
        key: &Arc<str>,
        weight: u32,
        timeout: Duration,
    ) -> Result<Permit, Refused> {
        let (arrival, grant) = {
            let mut state = self.shared.lock();
            if state.in_flight < state.max_in_flight {
                state.in_flight += 1;
                drop(state);
                return Ok(Permit {
                    shared: Some(Arc::clone(&self.shared)),
                    waited: Duration::ZERO,
                });
            }
            if state.draining {
                return Err(Refused::Draining {
                    waited: Duration::ZERO,
                });
            }
            state.enqueue(key, weight)
        };
        let since = Instant::now();
        let mut place = Place {
            shared: &self.shared,
            key,
            arrival,
            grant,
            queued: true,
        };
        let answer = match tokio::time::timeout(timeout, &mut place.grant).await {
            Ok(answer) => answer.ok(),
            Err(_) if place.leave() => {
                return Err(Refused::Timeout {
                    waited: since.elapsed(),
                })
            }
            // Let out of the queue just as the time ran out: the answer is in the channel.
            Err(_) => place.grant.try_recv().ok(),
        };
        place.queued = false;
        let waited = since.elapsed();
        match answer {
            Some(mut permit) => {
                permit.waited = waited;
                Ok(permit)
            }
            None => Err(Refused::Draining { waited }),
        }
    }

    /// Refuses every waiting request with [`Refused::Draining`], and from now on every
    /// request that would have to wait; requests in flight keep their permits, and a request
    /// that finds a place free is still admitted. Returns how many were refused.
    pub fn drain(&self) -> usize {
        let lanes = {
            let mut state = self.shared.lock();
            state.draining = true;
            state.waiting = 0;
            mem::take(&mut state.lanes)
        };
        // Dropping the senders answers the waiters; done outside the lock.
        lanes.values().map(|lane| lane.waiters.len()).sum()
    }

    /// The requests of `key` waiting now.
    pub fn queued(&self, key: &str) -> usize {
        self.shared
            .lock()
            .lanes
            .get(key)
            .map_or(0, |lane| lane.waiters.len())
    }

    pub fn snapshot(&self) -> Snapshot {
        let state = self.shared.lock();
        Snapshot {
            max_in_flight: state.max_in_flight,
            in_flight: state.in_flight,
            waiting: state.waiting,
            queued: state
                .lanes
                .iter()
                .filter(|(_, lane)| !lane.waiters.is_empty())
                .map(|(key, lane)| (Arc::clone(key), lane.waiters.len()))
                .collect(),
        }
    }
}

impl Shared {
    /// Nothing under this lock panics, so a poisoned lock still holds a consistent state.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Gives a place back: to the next waiter if there is one, else to the free places.
    fn release(self: &Arc<Self>) {
        let mut state = self.lock();
        while let Some(waiter) = state.next() {
            let permit = Permit {
                shared: Some(Arc::clone(self)),
                waited: Duration::ZERO,
            };
            match waiter.grant.send(permit) {
                Ok(()) => return,
                // The waiter is gone: hand the same place on without giving it back.
                Err(mut permit) => permit.shared = None,
            }
        }
        state.in_flight -= 1;
    }
}

impl State {
    fn enqueue(&mut self, key: &Arc<str>, weight: u32) -> (u64, oneshot::Receiver<Permit>) {
        let (grant, receiver) = oneshot::channel();
        let arrival = self.arrivals;
        self.arrivals += 1;
        self.waiting += 1;
        let lane = match self.lanes.get_mut(key) {
            Some(lane) => lane,
            None => self.lanes.entry(Arc::clone(key)).or_default(),
        };
        lane.waiters.push_back(Waiter {
            arrival,
            weight,
            grant,
        });
        (arrival, receiver)
    }

    /// Takes the head of the queue whose start tag is smallest, earliest arrival first
    /// among equal tags, and moves the virtual time to that tag. Costs a pass over the
    /// lanes, which are at most the keys with requests waiting or just let through.
    fn next(&mut self) -> Option<Waiter> {
        let now = self.virtual_time;
        let (_, key) = self
            .lanes
            .iter()
            .filter_map(|(key, lane)| {
                let head = lane.waiters.front()?;
                Some(((lane.finish.max(now), head.arrival), key))
            })
            .min()?;
        let key = Arc::clone(key);
        let lane = self.lanes.get_mut(&key)?;
        let waiter = lane.waiters.pop_front()?;
        let start = lane.finish.max(now);
        let cost = UNIT / u64::from(waiter.weight.clamp(1, UNIT as u32));
        lane.finish = start.saturating_add(cost);
        self.virtual_time = start;
        self.waiting -= 1;
        self.lanes
            .retain(|_, lane| !lane.waiters.is_empty() || lane.finish > start);
        Some(waiter)
    }

    /// Takes a waiter out of its key's queue; false if it is not there any more.
    fn leave(&mut self, key: &str, arrival: u64) -> bool {
        let Some(lane) = self.lanes.get_mut(key) else {
            return false;
        };
        let Ok(at) = lane
            .waiters
            .binary_search_by_key(&arrival, |waiter| waiter.arrival)
        else {
            return false;
        };
        lane.waiters.remove(at);
        self.waiting -= 1;
        if lane.waiters.is_empty() && lane.finish <= self.virtual_time {
            self.lanes.remove(key);
        }
        true
    }
}

/// A request's place in its key's queue, left when the waiting future is dropped.
struct Place<'a> {
    shared: &'a Shared,
    key: &'a Arc<str>,
    arrival: u64,
    grant: oneshot::Receiver<Permit>,
    queued: bool,
}

impl Place<'_> {
    fn leave(&mut self) -> bool {
        self.queued = false;
        self.shared.lock().leave(self.key, self.arrival)
    }
}

impl Drop for Place<'_> {
    /// Leaves the queue; a permit already sent stays in `grant`, which is dropped after the
    /// lock is released and gives it back.
    fn drop(&mut self) {
        if self.queued {
            self.leave();
        }
    }
}

impl Permit {
    /// How long the request waited in the queue; zero when it was admitted at once.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            shared.release();
        }
    }
}

impl Refused {
    pub fn waited(&self) -> Duration {
        match *self {
            Refused::Timeout { waited } | Refused::Draining { waited } => waited,
        }
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::Timeout { waited } => {
                write!(f, "no upstream place came free in {waited:?}")
            }
            Refused::Draining { .. } => f.write_str("the upstream queue is draining"),
        }
    }
}

impl Error for Refused {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll, Waker};

    const LONG: Duration = Duration::from_secs(3600);

    type Admission = Pin<Box<dyn Future<Output = Result<Permit, Refused>> + Send>>;

    /// A request waiting for admission, polled by hand so that every interleaving is exact.
    struct Request {
        key: &'static str,
        id: usize,
        admission: Admission,
    }

    fn admission(queue: &FairQueue, key: &str, weight: u32, timeout: Duration) -> Admission {
        let queue = queue.clone();
        let key: Arc<str> = Arc::from(key);
        Box::pin(async move { queue.admit(&key, weight, timeout).await })
    }

    fn poll(admission: &mut Admission) -> Poll<Result<Permit, Refused>> {
        admission
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
    }

    /// A request admitted at once.
    fn admitted(queue: &FairQueue, key: &str) -> Permit {
        match poll(&mut admission(queue, key, 1, LONG)) {
            Poll::Ready(Ok(permit)) => permit,
            other => panic!("{key} not admitted at once: {other:?}"),
        }
    }

    /// A request that has to wait.
    fn queued(queue: &FairQueue, key: &'static str, weight: u32, id: usize) -> Request {
        let mut admission = admission(queue, key, weight, LONG);
        assert!(
            poll(&mut admission).is_pending(),
            "{key} {id} admitted at once"
        );
        Request { key, id, admission }
    }

    /// The one waiting request that has been given a permit.
    fn granted(waiting: &mut Vec<Request>) -> (Request, Permit) {
        let mut ready: Vec<(usize, Permit)> = Vec::new();
        for (i, request) in waiting.iter_mut().enumerate() {
            match poll(&mut request.admission) {
                Poll::Ready(Ok(permit)) => ready.push((i, permit)),
                Poll::Ready(Err(refused)) => panic!("{} {}: {refused}", request.key, request.id),
                Poll::Pending => {}
            }
        }
        assert_eq!(ready.len(), 1, "exactly one waiter is let through");
        let (i, permit) = ready.pop().expect("one");
        (waiting.remove(i), permit)
    }

    /// Gives `permit` back and names who got the place, keeping its permit in `permit`.
    fn pass(permit: &mut Permit, waiting: &mut Vec<Request>) -> (&'static str, usize) {
        let (request, next) = granted_after(permit, waiting);
        *permit = next;
        (request.key, request.id)
    }

    fn granted_after(permit: &mut Permit, waiting: &mut Vec<Request>) -> (Request, Permit) {
        let placeholder = Permit {
            shared: None,
            waited: Duration::ZERO,
        };
        drop(mem::replace(permit, placeholder));
        granted(waiting)
    }

    fn depth(queue: &FairQueue) -> (usize, usize) {
        let snapshot = queue.snapshot();
        (snapshot.in_flight, snapshot.waiting)
    }

    #[tokio::test(start_paused = true)]
    async fn admits_at_once_up_to_max_in_flight_then_queues() {
        let queue = FairQueue::new(2);
        let first = admitted(&queue, "a");
        let second = admitted(&queue, "b");
        assert_eq!(first.waited(), Duration::ZERO);
        let mut waiting = vec![queued(&queue, "a", 1, 0)];
        assert_eq!(
            queue.snapshot(),
            Snapshot {
                max_in_flight: 2,
                in_flight: 2,
                waiting: 1,
                queued: vec![(Arc::from("a"), 1)],
            }
        );
        assert_eq!((queue.queued("a"), queue.queued("b")), (1, 0));
        tokio::time::advance(Duration::from_millis(1500)).await;
        drop(second);
        let (_, third) = granted(&mut waiting);
        assert_eq!(third.waited(), Duration::from_millis(1500));
        assert_eq!(depth(&queue), (2, 0));
        drop((first, third));
        assert_eq!(depth(&queue), (0, 0));
        assert!(queue.snapshot().queued.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_is_served_first_come_first_served() {
        let queue = FairQueue::new(1);
        let mut permit = admitted(&queue, "a");
        let mut waiting: Vec<Request> = (0..6).map(|id| queued(&queue, "a", 1, id)).collect();
        let order: Vec<usize> = (0..6).map(|_| pass(&mut permit, &mut waiting).1).collect();
        assert_eq!(order, [0, 1, 2, 3, 4, 5]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_light_key_waits_one_release_behind_a_flood() {
        let queue = FairQueue::new(4);
        let mut slots: Vec<Permit> = (0..4).map(|_| admitted(&queue, "batch")).collect();
        let mut waiting: Vec<Request> = (0..40).map(|id| queued(&queue, "batch", 1, id)).collect();
        // The batch key is being served from its queue when the interactive key turns up.
        for slot in &mut slots[..2] {
            pass(slot, &mut waiting);
        }
        for round in 0..10 {
            waiting.push(queued(&queue, "interactive", 1, round));
            let (key, id) = pass(&mut slots[round % 4], &mut waiting);
            assert_eq!((key, id), ("interactive", round), "round {round}");
            // Its request runs while one batch request starts elsewhere, then ends.
            assert_eq!(pass(&mut slots[(round + 1) % 4], &mut waiting).0, "batch");
            assert_eq!(pass(&mut slots[round % 4], &mut waiting).0, "batch");
        }
        // The batch key's own requests still went in order.
        let next_batch = waiting.iter().map(|r| r.id).min();
        assert_eq!(next_batch, Some(22));
    }

    #[tokio::test(start_paused = true)]
    async fn weights_share_the_releases() {
        let queue = FairQueue::new(1);
        let mut permit = admitted(&queue, "light");
        let mut waiting = Vec::new();
        for id in 0..40 {
            waiting.push(queued(&queue, "light", 1, id));
            waiting.push(queued(&queue, "heavy", 3, id));
        }
        let order: Vec<&str> = (0..40).map(|_| pass(&mut permit, &mut waiting).0).collect();
        for (i, window) in order.chunks(4).enumerate() {
            assert_eq!(window, ["light", "heavy", "heavy", "heavy"], "window {i}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_key_banks_no_credit() {
        let queue = FairQueue::new(1);
        let mut permit = admitted(&queue, "busy");
        let mut waiting: Vec<Request> = (0..20).map(|id| queued(&queue, "busy", 1, id)).collect();
        for _ in 0..10 {
            assert_eq!(pass(&mut permit, &mut waiting).0, "busy");
        }
        // "idle" had no requests while "busy" was served ten times: it gets its share from
        // now on, not ten releases in a row.
        waiting.extend((0..10).map(|id| queued(&queue, "idle", 1, id)));
        let order: Vec<&str> = (0..8).map(|_| pass(&mut permit, &mut waiting).0).collect();
        assert_eq!(order, ["idle", "busy"].repeat(4));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_past_its_timeout_is_refused_and_leaves_the_queue() {
        let queue = FairQueue::new(1);
        let mut permit = admitted(&queue, "a");
        let mut waiting = vec![queued(&queue, "a", 1, 0)];
        let key: Arc<str> = Arc::from("b");
        let refused = queue.admit(&key, 1, Duration::from_secs(5)).await;
        assert_eq!(
            refused.err(),
            Some(Refused::Timeout {
                waited: Duration::from_secs(5)
            })
        );
        assert_eq!(depth(&queue), (1, 1));
        assert_eq!(queue.queued("b"), 0);
        assert_eq!(pass(&mut permit, &mut waiting), ("a", 0));
        drop(permit);
        assert_eq!(depth(&queue), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_waiter_leaves_its_queue_at_once() {
        let queue = FairQueue::new(1);
        let mut permit = admitted(&queue, "a");
        let mut waiting = vec![
            queued(&queue, "a", 1, 0),
            queued(&queue, "a", 1, 1),
            queued(&queue, "b", 1, 0),
        ];
        drop(waiting.remove(0));
        assert_eq!(depth(&queue), (1, 2));
        assert_eq!(queue.queued("a"), 1);
        assert_eq!(pass(&mut permit, &mut waiting), ("a", 1));
        assert_eq!(pass(&mut permit, &mut waiting), ("b", 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_permit_granted_to_a_dropped_waiter_is_passed_on() {
        let queue = FairQueue::new(1);
        let permit = admitted(&queue, "a");
        let mut waiting = vec![queued(&queue, "a", 1, 0), queued(&queue, "b", 1, 0)];
        // The place goes to a:0, whose client hangs up before its task runs again.
        drop(permit);
        drop(waiting.remove(0));
        let (request, permit) = granted(&mut waiting);
        assert_eq!((request.key, request.id), ("b", 0));
        // With nobody left waiting, the place becomes free.
        let mut last = queued(&queue, "a", 1, 1);
        drop(permit);
        assert_eq!(depth(&queue), (1, 0));
        drop(last.admission);
        assert_eq!(depth(&queue), (0, 0));
        last.admission = admission(&queue, "a", 1, LONG);
        assert!(matches!(poll(&mut last.admission), Poll::Ready(Ok(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn draining_refuses_the_waiting_and_lets_the_in_flight_finish() {
        let queue = FairQueue::new(1);
        let permit = admitted(&queue, "a");
        let mut waiting: Vec<Request> = ["a", "b", "b"]
            .into_iter()
            .enumerate()
            .map(|(id, key)| queued(&queue, key, 1, id))
            .collect();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(queue.drain(), 3);
        for request in &mut waiting {
            assert_eq!(
                poll(&mut request.admission).map(Result::err),
                Poll::Ready(Some(Refused::Draining {
                    waited: Duration::from_secs(2)
                }))
            );
        }
        assert_eq!(depth(&queue), (1, 0));
        assert_eq!(
            poll(&mut admission(&queue, "c", 1, LONG)).map(Result::err),
            Poll::Ready(Some(Refused::Draining {
                waited: Duration::ZERO
            }))
        );
        drop(permit);
        assert_eq!(depth(&queue), (0, 0));
        drop(admitted(&queue, "c"));
    }

    /// splitmix64: a fixed sequence per seed, so a failing seed can be replayed.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) % n as u64) as usize
        }
    }

    /// Random arrivals, releases, hang-ups (some in the instant a permit is granted) and
    /// timeouts: the places out never exceed the limit, none is stranded, nobody waits
    /// while a place is free, and each key is served in its arrival order.
    #[tokio::test(start_paused = true)]
    async fn random_interleavings_never_leak_or_exceed_the_limit() {
        const KEYS: [(&str, u32); 3] = [("a", 1), ("b", 2), ("c", 3)];
        let mut timeouts = 0;
        for seed in 0..300 {
            let mut rng = Rng(seed);
            let max = 1 + rng.below(4);
            let queue = FairQueue::new(max);
            let mut held: Vec<Permit> = Vec::new();
            let mut waiting: Vec<Request> = Vec::new();
            for id in 0..200 {
                match rng.below(6) {
                    0 | 1 => {
                        let (key, weight) = KEYS[rng.below(KEYS.len())];
                        let timeout = Duration::from_millis(1 + rng.below(50) as u64);
                        let mut admission = admission(&queue, key, weight, timeout);
                        match poll(&mut admission) {
                            Poll::Ready(Ok(permit)) => held.push(permit),
                            Poll::Ready(Err(refused)) => panic!("seed {seed}: {refused}"),
                            Poll::Pending => waiting.push(Request { key, id, admission }),
                        }
                    }
                    2 if !held.is_empty() => drop(held.swap_remove(rng.below(held.len()))),
                    3 if !waiting.is_empty() => drop(waiting.swap_remove(rng.below(waiting.len()))),
                    4 if !held.is_empty() && !waiting.is_empty() => {
                        drop(held.swap_remove(rng.below(held.len())));
                        drop(waiting.swap_remove(rng.below(waiting.len())));
                    }
                    _ => tokio::time::advance(Duration::from_millis(rng.below(20) as u64)).await,
                }
                let (in_flight, queued) = depth(&queue);
                assert!(in_flight <= max, "seed {seed}: {in_flight} > {max}");
                assert!(held.len() <= in_flight, "seed {seed}");
                assert!(
                    queued == 0 || in_flight == max,
                    "seed {seed}: waits beside a free place"
                );
                if rng.below(3) == 0 {
                    let (mut let_through, mut passed_over, mut still) = (vec![], vec![], vec![]);
                    for mut request in waiting.drain(..) {
                        match poll(&mut request.admission) {
                            Poll::Ready(Ok(permit)) => {
                                let_through.push((request.key, request.id));
                                held.push(permit);
                            }
                            Poll::Ready(Err(Refused::Timeout { .. })) => {
                                timeouts += 1;
                                passed_over.push((request.key, request.id));
                            }
                            Poll::Ready(Err(refused)) => panic!("seed {seed}: {refused}"),
                            Poll::Pending => {
                                passed_over.push((request.key, request.id));
                                still.push(request);
                            }
                        }
                    }
                    waiting = still;
                    assert_eq!(depth(&queue), (held.len(), waiting.len()), "seed {seed}");
                    // A request still in its key's queue was there when a later one of the
                    // same key got through.
                    for (key, id) in let_through {
                        assert!(
                            passed_over.iter().all(|&(k, i)| k != key || i > id),
                            "seed {seed}: {key} {id} overtook {passed_over:?}"
                        );
                    }
                }
            }
            drop(waiting);
            drop(held);
            assert_eq!(queue.snapshot().in_flight, 0, "seed {seed}: a place leaked");
            assert_eq!(queue.snapshot().waiting, 0, "seed {seed}");
        }
        assert!(timeouts > 100, "the timeouts were exercised: {timeouts}");
    }

    /// Threads racing admissions, releases, hang-ups and timeouts against each other.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_admissions_never_exceed_the_limit_or_leak() {
        const MAX: usize = 3;
        let queue = FairQueue::new(MAX);
        let out = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..12u64)
            .map(|task| {
                let queue = queue.clone();
                let out = Arc::clone(&out);
                tokio::spawn(async move {
                    let mut rng = Rng(task);
                    let key: Arc<str> = Arc::from(["a", "b", "c"][task as usize % 3]);
                    for _ in 0..300 {
                        let timeout = Duration::from_micros(rng.below(2000) as u64);
                        let admit = queue.admit(&key, 1 + task as u32 % 3, timeout);
                        let hang_up = rng.below(4) == 0;
                        let permit = tokio::select! {
                            answer = admit => answer.ok(),
                            () = tokio::task::yield_now(), if hang_up => None,
                        };
                        if let Some(permit) = permit {
                            assert!(out.fetch_add(1, Ordering::SeqCst) < MAX);
                            tokio::task::yield_now().await;
                            out.fetch_sub(1, Ordering::SeqCst);
                            drop(permit);
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("no task panicked");
        }
        assert_eq!(depth(&queue), (0, 0));
    }
}
