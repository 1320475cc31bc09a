//! Ctrl-C (and SIGTERM) for the demo: the handler only sets a flag; the demo checks it between
//! steps and returns, so that every process it started is stopped by its owner's `Drop` and
//! every temporary directory removed. (In a terminal the children get the same SIGINT, being
//! in the foreground process group; stopping an already exited child is harmless.)

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    REQUESTED.store(true, Ordering::SeqCst);
}

pub fn install() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// Back to the default disposition (what runs after the demo, in `cargo xtask test`, stops
/// on Ctrl-C as usual).
pub fn uninstall() {
    // SAFETY: restoring the default disposition.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
        libc::signal(libc::SIGTERM, libc::SIG_DFL);
    }
    REQUESTED.store(false, Ordering::SeqCst);
}

pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
