//! The threads the kernels split their work over: the caller and one helper per further core,
//! helpers that keep spinning for a while after each job instead of going to sleep at once.
//!
//! Why not rayon's pool: a training step runs about 500 parallel sections of 50 µs to 2 ms,
//! separated by short stretches of single-threaded work. rayon's workers sleep in between, and
//! on a virtual machine waking a sleeping core costs 100–180 µs (measured here: two 100 µs
//! halves took 277 µs after 1 ms of serial work), a tenth of a LoRA step. Here a helper spins
//! (yielding the core to any other runnable thread) for [`SPIN`] after its last job and only then
//! parks, and the caller computes its own share instead of waiting for a worker to wake.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle helper waits for the next job before it parks.
const SPIN: Duration = Duration::from_millis(2);

/// The parts of one job: `f(part)` for every part below `parts`.
#[derive(Clone, Copy)]
struct Job {
    /// The caller's closure with its lifetime erased; [`run_parts`] does not return before
    /// every helper has finished with it.
    f: *const (dyn Fn(usize) + Sync),
    parts: usize,
}

// SAFETY: the closure is `Sync`, and the pointer is only used while `run_parts` keeps it alive.
unsafe impl Send for Job {}

struct Pool {
    helpers: usize,
    /// Incremented to publish a job; a helper runs each epoch once.
    epoch: AtomicUsize,
    job: Mutex<Option<Job>>,
    /// Helpers still working on the current epoch.
    pending: AtomicUsize,
    /// Set when a part panicked on a helper; the caller panics in turn.
    failed: std::sync::atomic::AtomicBool,
    /// Serialises callers: one job at a time, the others run theirs alone.
    busy: Mutex<()>,
    wake: Condvar,
    parked: Mutex<usize>,
}

thread_local! {
    static IS_HELPER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            helpers: cores.saturating_sub(1),
            epoch: AtomicUsize::new(0),
            job: Mutex::new(None),
            pending: AtomicUsize::new(0),
            failed: std::sync::atomic::AtomicBool::new(false),
            busy: Mutex::new(()),
            wake: Condvar::new(),
            parked: Mutex::new(0),
        }));
        for index in 0..pool.helpers {
            std::thread::Builder::new()
                .name(format!("fedtune-kernel-{index}"))
                .spawn(move || helper(pool, index + 1))
                .expect("the OS starts a kernel helper thread");
        }
        pool
    })
}

/// Threads a job can run on: the caller and the helpers.
pub fn threads() -> usize {
    pool().helpers + 1
}

/// Runs `f(0) … f(parts − 1)`, spread over the calling thread and the helpers, and returns when
/// all have finished. Parts must be independent. A call made while another is running (from
/// another thread, or from inside a part) runs its parts on the calling thread.
pub fn run_parts(parts: usize, f: &(dyn Fn(usize) + Sync)) {
    let pool = pool();
    let nested = IS_HELPER.with(std::cell::Cell::get);
    let guard = if parts > 1 && pool.helpers > 0 && !nested {
        pool.busy.try_lock().ok()
    } else {
        None
    };
    let Some(_guard) = guard else {
        (0..parts).for_each(f);
        return;
    };
    let threads = pool.helpers + 1;
    // SAFETY (lifetime erasure): this function waits below until `pending` is 0, that is until
    // every helper is done with `f`, before `f` can go out of scope.
    let erased: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
    *pool.job.lock().expect("the job slot is never poisoned") = Some(Job { f: erased, parts });
    pool.pending.store(pool.helpers, Ordering::Release);
    pool.epoch.fetch_add(1, Ordering::AcqRel);
    if *pool
        .parked
        .lock()
        .expect("the park count is never poisoned")
        > 0
    {
        pool.wake.notify_all();
    }
    for part in (0..parts).step_by(threads) {
        f(part);
    }
    while pool.pending.load(Ordering::Acquire) > 0 {
        // Yield rather than spin: where the helper shares this core, it needs it to finish.
        std::thread::yield_now();
    }
    if pool.failed.swap(false, Ordering::AcqRel) {
        panic!("a kernel part panicked on a helper thread");
    }
}

/// A slice cut into pieces that parallel parts write, one part per piece. It borrows the
/// slice, so the slice outlives every piece.
pub(crate) struct Pieces<'a, T> {
    base: *mut T,
    len: usize,
    piece: usize,
    slice: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: each piece is handed to one part only (see `get`), so no element is shared.
unsafe impl<T: Send> Sync for Pieces<'_, T> {}

impl<'a, T> Pieces<'a, T> {
    /// `data` in pieces of `piece` elements (the last may be shorter).
    pub(crate) fn new(data: &'a mut [T], piece: usize) -> Self {
        Self {
            base: data.as_mut_ptr(),
            len: data.len(),
            piece: piece.max(1),
            slice: std::marker::PhantomData,
        }
    }

    /// Number of pieces.
    pub(crate) fn count(&self) -> usize {
        self.len.div_ceil(self.piece)
    }

    /// Piece `i`.
    ///
    /// # Safety
    /// At most one caller at a time holds piece `i`.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn get(&self, i: usize) -> &mut [T] {
        let start = (i * self.piece).min(self.len);
        let end = (start + self.piece).min(self.len);
        // SAFETY: start..end lies inside the slice; the caller vouches for exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(start), end - start) }
    }
}

/// Helper `slot` (1-based: the caller is slot 0) takes parts `slot, slot + threads, …`.
fn helper(pool: &'static Pool, slot: usize) {
    IS_HELPER.with(|h| h.set(true));
    let threads = pool.helpers + 1;
    let mut seen = 0;
    loop {
        let since = Instant::now();
        while pool.epoch.load(Ordering::Acquire) == seen {
            if since.elapsed() > SPIN {
                let mut parked = pool
                    .parked
                    .lock()
                    .expect("the park count is never poisoned");
                *parked += 1;
                while pool.epoch.load(Ordering::Acquire) == seen {
                    parked = pool
                        .wake
                        .wait(parked)
                        .expect("the park count is never poisoned");
                }
                *parked -= 1;
                break;
            }
            std::thread::yield_now();
        }
        seen = pool.epoch.load(Ordering::Acquire);
        let job = pool
            .job
            .lock()
            .expect("the job slot is never poisoned")
            .expect("a published job");
        // SAFETY: the caller keeps the closure alive until `pending` reaches 0, below.
        let f = unsafe { &*job.f };
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for part in (slot..job.parts).step_by(threads) {
                f(part);
            }
        }));
        if run.is_err() {
            pool.failed.store(true, Ordering::Release);
        }
        pool.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_part_runs_once_also_from_many_callers_at_once() {
        let callers: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    for parts in [0usize, 1, 2, 3, 7] {
                        let hits: Vec<AtomicU64> = (0..parts).map(|_| AtomicU64::new(0)).collect();
                        run_parts(parts, &|p| {
                            hits[p].fetch_add(1, Ordering::Relaxed);
                            // A nested call runs on this thread.
                            run_parts(2, &|_| {});
                        });
                        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                    }
                })
            })
            .collect();
        for caller in callers {
            caller.join().expect("no caller panics");
        }
    }
}
