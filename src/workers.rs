//! Thread per core: client connections are accepted and served on `[server] workers`
//! threads, each running its own current-thread runtime.
//!
//! Every worker accepts from its own copy of each listening socket (the kernel wakes
//! whichever is waiting), so a connection, its upstream socket and every task it spawns
//! (a pooled HTTP upstream connection's driver, the in-memory echo) live on the thread
//! that accepted it: a frame read from one socket wakes the task that writes it to the
//! other without crossing threads or a work-stealing queue. Measured against tokio's
//! shared work-stealing runtime in the issue-30 A/B (README, "Performance").
//!
//! Balance: WebSocket connections live for hours, so a worker that happens to win more
//! accepts would keep them. A worker more than [`AHEAD_SLACK`] connections ahead of the
//! least loaded one stops accepting until it no longer is (the others take the queue).

use std::{
    cell::{Cell, RefCell},
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

/// How many connections a worker may hold beyond the least loaded one and still accept.
const AHEAD_SLACK: usize = 16;
/// A worker that is ahead looks again when any count changes, and at least this often.
pub(crate) const AHEAD_RECHECK: Duration = Duration::from_millis(100);
/// Blocking threads (DNS lookups of upstream hosts) for all workers together, as one
/// multi-thread runtime would have.
const BLOCKING_THREADS: usize = 512;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
    /// The worker's tasks: its thread ends only when the last of them has.
    static TASKS: RefCell<Option<TaskTracker>> = const { RefCell::new(None) };
}

/// Which worker this thread is: 1..=N on a worker thread, 0 elsewhere (the main
/// runtime, tests' runtimes). Pools key idle upstream connections by it, so a request
/// reuses a connection whose driver task runs on its own thread.
pub(crate) fn current() -> usize {
    WORKER.with(|w| w.get())
}

/// How many workers `[server] workers = 0` means: one per core the process may use.
pub(crate) fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The worker threads `[server] workers` asks for (0: [`default_count`]).
pub(crate) fn count(configured: usize) -> usize {
    match configured {
        0 => default_count(),
        n => n,
    }
}

/// Spawn a connection's task on this thread's runtime; on a worker, tracked so the
/// worker's thread outlives it.
pub(crate) fn spawn<F>(task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    match TASKS.with(|t| t.borrow().clone()) {
        Some(tracker) => drop(tracker.spawn(task)),
        None => drop(tokio::spawn(task)),
    }
}

/// Connections open on each worker.
pub(crate) struct Load {
    open: Box<[AtomicUsize]>,
    /// Workers that accept no more (their accept loops ended): not counted as the least
    /// loaded, or the others would wait for them forever.
    retired: Box<[std::sync::atomic::AtomicBool]>,
    /// Fired when a count changes: a worker that is ahead looks again.
    changed: tokio::sync::Notify,
}

impl Load {
    pub(crate) fn new(workers: usize) -> Arc<Load> {
        Arc::new(Load {
            open: (0..workers.max(1)).map(|_| AtomicUsize::new(0)).collect(),
            retired: (0..workers.max(1)).map(|_| Default::default()).collect(),
            changed: tokio::sync::Notify::new(),
        })
    }

    /// Wait until worker `me` is no longer [`Load::ahead`].
    pub(crate) async fn wait_turn(&self, me: usize) {
        loop {
            // Made before the check: a change between the two still wakes it.
            let changed = self.changed.notified();
            if !self.ahead(me) {
                return;
            }
            let _ = tokio::time::timeout(AHEAD_RECHECK, changed).await;
        }
    }

    /// Marks worker `me` as accepting no more once the guard is dropped.
    pub(crate) fn retire_on_drop(self: &Arc<Self>, me: usize) -> Mark {
        Mark {
            load: self.clone(),
            me,
            retires: true,
        }
    }

    /// Whether worker `me` (1-based; 0 is never ahead) should let the others accept.
    pub(crate) fn ahead(&self, me: usize) -> bool {
        let Some(mine) = me.checked_sub(1).and_then(|i| self.open.get(i)) else {
            return false;
        };
        let least = self
            .open
            .iter()
            .zip(&self.retired)
            .filter(|(_, retired)| !retired.load(Ordering::Relaxed))
            .map(|(o, _)| o.load(Ordering::Relaxed))
            .min();
        // No other worker accepting: this one takes everything.
        least.is_some_and(|least| mine.load(Ordering::Relaxed) > least + AHEAD_SLACK)
    }

    /// Count one connection on worker `me` while the guard lives.
    pub(crate) fn hold(self: &Arc<Self>, me: usize) -> Mark {
        if let Some(open) = me.checked_sub(1).and_then(|i| self.open.get(i)) {
            open.fetch_add(1, Ordering::Relaxed);
            self.changed.notify_waiters();
        }
        Mark {
            load: self.clone(),
            me,
            retires: false,
        }
    }

    /// Connections open on each worker, in worker order.
    pub(crate) fn open(&self) -> Vec<usize> {
        self.open.iter().map(|o| o.load(Ordering::Relaxed)).collect()
    }
}

/// Undone or done when dropped: one connection counted on its worker ([`Load::hold`]),
/// or the worker marked retired once its accept loops end, stopped or by a panic
/// ([`Load::retire_on_drop`]).
pub(crate) struct Mark {
    load: Arc<Load>,
    me: usize,
    retires: bool,
}

impl Drop for Mark {
    fn drop(&mut self) {
        let Some(i) = self.me.checked_sub(1).filter(|i| *i < self.load.open.len()) else {
            return;
        };
        if self.retires {
            self.load.retired[i].store(true, Ordering::Relaxed);
        } else {
            self.load.open[i].fetch_sub(1, Ordering::Relaxed);
        }
        self.load.changed.notify_waiters();
    }
}

/// Start one worker thread per item of `each`. Worker `i` (1-based) first runs
/// `open(item)` in its own current-thread runtime (registering its listeners there);
/// once every worker has opened, each runs `serve(i, opened)` (its accept loops), then
/// every task it spawned through [`spawn`] to the end, then its thread ends. An error
/// of any `open` is returned (the workers that did open are told to end; `serve` is run
/// by none). Each receiver completes when its worker's `serve` has returned.
pub(crate) fn start<T, L, O, F, Fut>(each: Vec<T>, open: O, serve: F) -> std::io::Result<Vec<oneshot::Receiver<()>>>
where
    T: Send + 'static,
    O: Fn(T) -> std::io::Result<L> + Send + Sync + 'static,
    F: Fn(usize, L) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let count = each.len();
    let (open, serve) = (Arc::new(open), Arc::new(serve));
    let (opened_tx, opened) = std::sync::mpsc::channel();
    let mut accepting = Vec::with_capacity(count);
    let mut go = Vec::with_capacity(count);
    for (i, item) in each.into_iter().enumerate() {
        let me = i + 1;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads((BLOCKING_THREADS / count).max(8))
            .build()?;
        let (done, rx) = oneshot::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<bool>();
        let (open, serve, opened_tx) = (open.clone(), serve.clone(), opened_tx.clone());
        std::thread::Builder::new().name(format!("wsgate-worker-{me}")).spawn(move || {
            let tasks = TaskTracker::new();
            WORKER.with(|w| w.set(me));
            TASKS.with(|t| *t.borrow_mut() = Some(tasks.clone()));
            let item = {
                let _in_runtime = runtime.enter();
                open(item)
            };
            let item = match item {
                Ok(item) => {
                    let _ = opened_tx.send(Ok(()));
                    item
                }
                Err(e) => {
                    let _ = opened_tx.send(Err(e));
                    return;
                }
            };
            if go_rx.recv() != Ok(true) {
                return;
            }
            runtime.block_on(async move {
                serve(me, item).await;
                let _ = done.send(());
                tasks.close();
                tasks.wait().await;
            });
            TASKS.with(|t| t.borrow_mut().take());
        })?;
        accepting.push(rx);
        go.push(go_tx);
    }
    drop(opened_tx);
    let mut failed = None;
    for _ in 0..count {
        match opened.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed = failed.or(Some(e)),
            Err(_) => failed = failed.or(Some(std::io::Error::other("a worker thread ended while starting"))),
        }
    }
    for g in go {
        let _ = g.send(failed.is_none());
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(accepting),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_far_ahead_of_the_least_loaded_one_stops_accepting() {
        let load = Load::new(2);
        let held: Vec<_> = (0..AHEAD_SLACK).map(|_| load.hold(1)).collect();
        assert!(!load.ahead(1), "{:?}: within the slack", load.open());
        let one_more = load.hold(1);
        assert!(load.ahead(1), "{:?}", load.open());
        assert!(!load.ahead(2) && !load.ahead(0), "the least loaded and a non-worker accept");
        let other = load.hold(2);
        assert!(!load.ahead(1), "{:?}: the other caught up by one", load.open());
        drop((other, one_more, held));
        assert_eq!(load.open(), [0, 0]);
    }

    #[test]
    fn a_worker_that_accepts_no_more_holds_no_other_back() {
        let load = Load::new(2);
        let held: Vec<_> = (0..=AHEAD_SLACK + 5).map(|_| load.hold(1)).collect();
        assert!(load.ahead(1));
        drop(load.retire_on_drop(2));
        assert!(!load.ahead(1), "worker 2 retired: worker 1 takes everything");
        drop(held);
    }

    #[test]
    fn a_worker_that_cannot_open_fails_the_start_and_none_serves() {
        let served = Arc::new(AtomicUsize::new(0));
        let counted = served.clone();
        let started = start(
            vec![true, false, true],
            |ok| if ok { Ok(()) } else { Err(std::io::Error::other("no listener")) },
            move |_, ()| {
                counted.fetch_add(1, Ordering::SeqCst);
                async {}
            },
        );
        assert_eq!(started.err().map(|e| e.to_string()), Some("no listener".to_string()));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(served.load(Ordering::SeqCst), 0, "a worker served after a failed start");
    }

    #[test]
    fn tasks_spawned_on_a_worker_keep_its_thread_until_they_end() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        let done = start(vec![(tx, wait)], Ok, |me, (tx, wait)| async move {
            spawn(async move {
                let _ = wait.await;
                let _ = tx.send((current(), std::thread::current().name().map(str::to_string)));
            });
            assert_eq!(me, 1);
        })
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            for d in done {
                d.await.unwrap();
            }
        });
        assert!(rx.try_recv().is_err(), "the task ran before it was released");
        release.send(()).unwrap();
        let (worker, name) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!((worker, name.as_deref()), (1, Some("wsgate-worker-1")));
        assert_eq!(current(), 0, "the test's thread is no worker");
    }
}
