//! The stop signal: SIGINT/SIGTERM/SIGHUP ask a training loop to finish its step,
//! checkpoint and exit. [`StopSignal`] is passed to the loop (no process-global), so a
//! test or a second loop can hold its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A flag set by a signal (or by [`StopSignal::set`]), shared between the signal thread
/// and the loop; clones share the flag.
#[derive(Debug, Clone, Default)]
pub struct StopSignal(Arc<AtomicBool>);

impl StopSignal {
    /// A flag that nothing has set yet.
    pub fn new() -> StopSignal {
        StopSignal::default()
    }

    /// Whether a stop was asked for.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Asks for a stop; returns whether one had been asked for already.
    pub fn set(&self) -> bool {
        self.0.swap(true, Ordering::SeqCst)
    }
}

/// Takes SIGINT/SIGTERM for the returned [`StopSignal`]: the first signal sets it; a
/// second one, while a long checkpoint or kNN evaluation is still finishing, ends the
/// process at once with exit code 130 (`_exit`: the run keeps its last complete
/// checkpoint). SIGHUP (a worker's launcher died, see `byol_dist::launch`) sets it
/// however often it comes.
///
/// The three signals are blocked in the calling thread, and so in every thread created
/// after it (libtorch's, Gloo's, the loader's), and one thread waits for them with
/// `sigwait(2)`. A handler would run on whichever thread the kernel picks: a signal
/// landing on a Gloo or TCPStore thread interrupts its `epoll_wait` (`EINTR`), which
/// c10d reports as a failed collective. Call it first, before any thread starts.
///
/// # Errors
/// The operating system refused to change the signal mask or to start the thread.
pub fn install_signal_handlers() -> std::io::Result<StopSignal> {
    // SAFETY: sigset_t is plain data; these calls only fill and apply it.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        set
    };
    let stop = StopSignal::new();
    let flag = stop.clone();
    std::thread::Builder::new()
        .name("byol-signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: waits for one of the blocked signals in `set`.
            let rc = unsafe { libc::sigwait(&set, &mut sig) };
            if rc != 0 {
                continue;
            }
            if flag.set() && sig != libc::SIGHUP {
                // At once: exit() would run libtorch's static destructors while the
                // training thread still uses them.
                // SAFETY: ends the process without running anything else.
                unsafe { libc::_exit(130) };
            }
        })?;
    Ok(stop)
}
