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
/// How long a worker that is ahead waits before looking again.
pub(crate) const AHEAD_PAUSE: Duration = Duration::from_millis(2);

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
}

impl Load {
    pub(crate) fn new(workers: usize) -> Arc<Load> {
        Arc::new(Load {
            open: (0..workers.max(1)).map(|_| AtomicUsize::new(0)).collect(),
        })
    }

    /// Whether worker `me` (1-based; 0 is never ahead) should let the others accept.
    pub(crate) fn ahead(&self, me: usize) -> bool {
        let Some(mine) = me.checked_sub(1).and_then(|i| self.open.get(i)) else {
            return false;
        };
        let least = self.open.iter().map(|o| o.load(Ordering::Relaxed)).min().unwrap_or(0);
        mine.load(Ordering::Relaxed) > least + AHEAD_SLACK
    }

    /// Count one connection on worker `me` while the guard lives.
    pub(crate) fn hold(self: &Arc<Self>, me: usize) -> OnWorker {
        if let Some(open) = me.checked_sub(1).and_then(|i| self.open.get(i)) {
            open.fetch_add(1, Ordering::Relaxed);
        }
        OnWorker { load: self.clone(), me }
    }

    /// Connections open on each worker, in worker order.
    pub(crate) fn open(&self) -> Vec<usize> {
        self.open.iter().map(|o| o.load(Ordering::Relaxed)).collect()
    }
}

/// One connection counted on its worker.
pub(crate) struct OnWorker {
    load: Arc<Load>,
    me: usize,
}

impl Drop for OnWorker {
    fn drop(&mut self) {
        if let Some(open) = self.me.checked_sub(1).and_then(|i| self.load.open.get(i)) {
            open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Start one worker thread per item of `each`: worker `i` (1-based) runs `serve(i, item)`
/// (its accept loops) on its own current-thread runtime, then every task it spawned
/// through [`spawn`] to the end, then its thread ends. Each receiver completes when its
/// worker's `serve` has returned (it accepts no more).
pub(crate) fn start<T, F, Fut>(each: Vec<T>, serve: F) -> std::io::Result<Vec<oneshot::Receiver<()>>>
where
    T: Send + 'static,
    F: Fn(usize, T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let serve = Arc::new(serve);
    let mut accepting = Vec::with_capacity(each.len());
    for (i, item) in each.into_iter().enumerate() {
        let me = i + 1;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (done, rx) = oneshot::channel();
        let serve = serve.clone();
        std::thread::Builder::new().name(format!("wsgate-worker-{me}")).spawn(move || {
            let tasks = TaskTracker::new();
            WORKER.with(|w| w.set(me));
            TASKS.with(|t| *t.borrow_mut() = Some(tasks.clone()));
            runtime.block_on(async move {
                serve(me, item).await;
                let _ = done.send(());
                tasks.close();
                tasks.wait().await;
            });
            TASKS.with(|t| t.borrow_mut().take());
        })?;
        accepting.push(rx);
    }
    Ok(accepting)
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
    fn tasks_spawned_on_a_worker_keep_its_thread_until_they_end() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        let done = start(vec![(tx, wait)], |me, (tx, wait)| async move {
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
