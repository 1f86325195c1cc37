//! The threads that run a forward pass's parallel loops: the calling
//! thread plus helpers that spin between loops instead of sleeping.
//!
//! A pass has a few hundred parallel loops (seven matmuls and the attention
//! of every layer) separated by a few microseconds of serial work (norms,
//! RoPE, residual adds). A work-stealing pool's idle thread yields a few
//! dozen times and then sleeps, so on the project's 2-vCPU VM the helper fell
//! asleep between most loops of a 40-row pass (about 180 context switches a
//! pass) and every loop began by waking it: a futex and an inter-processor
//! interrupt through the hypervisor, whose latency varies. Here a helper
//! spins on an epoch counter for [`SPIN`] after its last task and parks
//! only when the pass is over, as llama.cpp's thread pool does.
//!
//! Results never depend on which thread runs a task: tasks write disjoint
//! outputs and each is computed by the same code wherever it runs. A loop
//! started while the team is busy (another thread's pass, or a loop inside
//! a task) runs on its caller alone.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a helper spins for the next loop before it parks: longer than
/// the serial gaps inside a pass, short next to the gaps between passes.
const SPIN: Duration = Duration::from_micros(500);

/// A loop's body, type-erased: `call(data, i)` runs task `i`.
#[derive(Clone, Copy)]
struct Job {
    data: *const (),
    call: unsafe fn(*const (), usize),
    tasks: usize,
}

// SAFETY: `data` points at a `Sync` closure that outlives every use (the
// caller of `run` waits for all helpers before returning).
unsafe impl Send for Job {}

struct Shared {
    /// Bumped for every loop; helpers watch it.
    epoch: AtomicUsize,
    /// The current loop (written before `epoch` is bumped).
    job: Mutex<Option<Job>>,
    /// Next task index to claim.
    next: AtomicUsize,
    /// Helpers still working on the current loop.
    busy: AtomicUsize,
    panicked: AtomicBool,
    /// Parked helpers wait here for a new epoch.
    parked: Mutex<usize>,
    wake: Condvar,
}

pub struct Team {
    shared: &'static Shared,
    helpers: usize,
    /// Held by the thread whose loop the team is running.
    running: Mutex<()>,
}

/// The process's team: `threads` = rayon's thread count (so `RAYON_NUM_THREADS`
/// and `--threads` set it), the caller being one of them.
pub fn team() -> &'static Team {
    static TEAM: OnceLock<Team> = OnceLock::new();
    TEAM.get_or_init(|| Team::new(rayon::current_num_threads().max(1) - 1))
}

impl Team {
    fn new(helpers: usize) -> Team {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            epoch: AtomicUsize::new(0),
            job: Mutex::new(None),
            next: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            parked: Mutex::new(0),
            wake: Condvar::new(),
        }));
        for i in 0..helpers {
            std::thread::Builder::new().name(format!("tandem-team-{i}")).spawn(move || helper(shared)).expect("spawning a kernel thread");
        }
        Team { shared, helpers, running: Mutex::new(()) }
    }

    /// Threads a loop runs on (the caller included).
    pub fn threads(&self) -> usize {
        self.helpers + 1
    }

    /// Runs `f(0..tasks)`, each index once, on the team; returns when all
    /// are done. A panic in a task is raised here.
    pub fn run<F: Fn(usize) + Sync>(&self, tasks: usize, f: F) {
        let guard = match self.running.try_lock() {
            Ok(g) if self.helpers > 0 && tasks > 1 => g,
            _ => return (0..tasks).for_each(f),
        };
        unsafe fn call<F: Fn(usize)>(data: *const (), i: usize) {
            // SAFETY: `data` is the `&F` set below, alive until `run` returns.
            unsafe { (*(data as *const F))(i) }
        }
        let s = self.shared;
        *s.job.lock().unwrap() = Some(Job { data: &f as *const F as *const (), call: call::<F>, tasks });
        s.next.store(0, Ordering::Relaxed);
        s.busy.store(self.helpers, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::Release);
        if *s.parked.lock().unwrap() > 0 {
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| claim(s, tasks, &f)));
        while s.busy.load(Ordering::Acquire) > 0 {
            std::hint::spin_loop();
        }
        *s.job.lock().unwrap() = None;
        let helper_panicked = s.panicked.swap(false, Ordering::Relaxed);
        drop(guard);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        assert!(!helper_panicked, "a kernel task panicked on a helper thread");
    }
}

/// Claims and runs tasks until none are left.
fn claim(s: &Shared, tasks: usize, f: &dyn Fn(usize)) {
    loop {
        let i = s.next.fetch_add(1, Ordering::Relaxed);
        if i >= tasks {
            return;
        }
        f(i);
    }
}

fn helper(s: &'static Shared) {
    let mut seen = 0;
    loop {
        let started = Instant::now();
        let mut spins = 0u32;
        while s.epoch.load(Ordering::Acquire) == seen {
            std::hint::spin_loop();
            spins += 1;
            if spins.is_multiple_of(256) && started.elapsed() > SPIN {
                let mut parked = s.parked.lock().unwrap();
                *parked += 1;
                while s.epoch.load(Ordering::Acquire) == seen {
                    parked = s.wake.wait(parked).unwrap();
                }
                *parked -= 1;
            }
        }
        seen = s.epoch.load(Ordering::Acquire);
        let job = *s.job.lock().unwrap();
        if let Some(job) = job {
            // SAFETY: the job's closure lives until every helper has
            // decremented `busy`, which happens after this call.
            let ok = catch_unwind(AssertUnwindSafe(|| claim(s, job.tasks, &|i| unsafe { (job.call)(job.data, i) }))).is_ok();
            if !ok {
                s.panicked.store(true, Ordering::Relaxed);
            }
        }
        s.busy.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_from_any_caller_and_nesting_falls_back_to_the_caller() {
        let team = Team::new(1);
        let counts: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        // Several callers at once: one gets the team, the others run alone.
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..50 {
                        team.run(counts.len(), |i| {
                            counts[i].fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 200));
        let inner = AtomicUsize::new(0);
        team.run(8, |_| team.run(3, |_| drop(inner.fetch_add(1, Ordering::Relaxed))));
        assert_eq!(inner.load(Ordering::Relaxed), 24);
    }

    #[test]
    fn a_panicking_task_is_raised_to_the_caller_and_the_team_goes_on() {
        let team = Team::new(1);
        for _ in 0..20 {
            let caught = catch_unwind(AssertUnwindSafe(|| team.run(64, |i| assert_ne!(i, 63, "task 63 fails"))));
            assert!(caught.is_err());
        }
        let done = AtomicUsize::new(0);
        // After parking (no loop for longer than SPIN) a helper still wakes.
        std::thread::sleep(SPIN * 4);
        team.run(64, |_| drop(done.fetch_add(1, Ordering::Relaxed)));
        assert_eq!(done.load(Ordering::Relaxed), 64);
    }
}
