//! The compute pool the forward pass's parallel loops run on.

use crate::{ModelError, Result};

/// Builds rayon's global pool: `threads` threads (default: one per CPU
/// this process may run on), each pinned to one of those CPUs in turn
/// when `pin` is set (Linux only; elsewhere threads float). Call once at
/// start, before any pass; returns the number of threads.
///
/// Why pin: a pass is a few hundred short parallel loops and ends when its
/// slower thread does. Left to float, the kernel at times stacks both
/// threads of a 2-vCPU VM on one CPU or moves one to a cold core, and the
/// same batch takes 4–9 % more or less from one run to the next: noise the
/// server's verification-time estimator cannot learn. Measured on a 2-vCPU
/// AMD EPYC VM, pinned against floating, runs alternated:
/// `tandem-bench estimator` MAPE 3.6–5.8 % against 6.1–12.9 % (six runs
/// each; p95 error 10.6–16.6 % against 20.6–30.0 %); `tandem-bench live`
/// (2 devices, 8 s, four runs each) WISP estimator error 3–17 % against
/// 13–21 % and pass time per token 4.30 against 4.70 ms (SLED 3.87 against
/// 4.37 ms). Unlike the spinning thread team tried earlier (docs/measurements.md), pinned
/// threads still sleep between passes, so the gRPC threads keep their share.
/// The edge does not pin: a phone's or laptop's scheduler knows its cores
/// (big and little) better.
pub fn build_compute_pool(threads: Option<usize>, pin: bool) -> Result<usize> {
    let (builder, n) = pool_builder(threads, pin)?;
    builder.build_global().map_err(|e| ModelError::InvalidArgument(format!("building the compute pool: {e}")))?;
    Ok(n)
}

fn pool_builder(threads: Option<usize>, pin: bool) -> Result<(rayon::ThreadPoolBuilder, usize)> {
    let cpus = allowed_cpus();
    let n = threads.unwrap_or(cpus.len().max(1));
    if n == 0 {
        return Err(ModelError::InvalidArgument("the compute pool needs at least one thread".into()));
    }
    // Named (within the 15 characters Linux keeps) so `top -H` and /proc
    // show which threads run the model.
    let mut builder = rayon::ThreadPoolBuilder::new().num_threads(n).thread_name(|i| format!("tandem-model-{i}"));
    if pin && !cpus.is_empty() {
        builder = builder.start_handler(move |i| pin_current_thread(cpus[i % cpus.len()]));
    }
    Ok((builder, n))
}

/// The CPUs this process may run on, in order (empty where unknown).
fn allowed_cpus() -> Vec<usize> {
    #[cfg(target_os = "linux")]
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most
    // the size it is given.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            return (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect();
        }
    }
    std::thread::available_parallelism().map_or(Vec::new(), |n| (0..n.get()).collect())
}

fn pin_current_thread(cpu: usize) {
    #[cfg(target_os = "linux")]
    // SAFETY: as above; the call only changes this thread's affinity. A
    // refusal (a seccomp policy, a cpuset changed since) leaves the thread
    // floating, which is only harder to predict.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cpu;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool built as the global one is (on its own, since the global
    /// pool can be built only once a process) has thread i on CPU i.
    #[test]
    #[cfg(target_os = "linux")]
    fn pinned_threads_run_on_their_cpu() {
        let cpus = allowed_cpus();
        let (builder, n) = pool_builder(None, true).unwrap();
        assert_eq!(n, cpus.len());
        let seen = builder.build().unwrap().broadcast(|_| allowed_cpus());
        for (i, s) in seen.iter().enumerate() {
            assert_eq!(s, &[cpus[i]], "thread {i} is not pinned to CPU {}", cpus[i]);
        }
        assert!(pool_builder(Some(0), true).is_err(), "a pool of no threads");
    }
}
