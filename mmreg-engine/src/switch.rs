//! A process-wide switch read from an environment variable once, which tests and benchmarks may set.

use std::sync::atomic::{AtomicU8, Ordering};

/// A process-wide switch, off unless its environment variable is `1` or a function sets it.
pub(crate) struct Switch {
    /// 0: undecided; 1: off; 2: on.
    state: AtomicU8,
    var: &'static str,
}

impl Switch {
    pub(crate) const fn new(var: &'static str) -> Self {
        Switch {
            state: AtomicU8::new(0),
            var,
        }
    }

    pub(crate) fn get(&self) -> bool {
        if self.state.load(Ordering::Relaxed) == 0 {
            let on = std::env::var(self.var).is_ok_and(|v| v == "1");
            let decided = 1 + u8::from(on);
            let _ = (self.state).compare_exchange(0, decided, Ordering::Relaxed, Ordering::Relaxed);
        }
        self.state.load(Ordering::Relaxed) == 2
    }

    pub(crate) fn set(&self, on: bool) {
        self.state.store(1 + u8::from(on), Ordering::Relaxed);
    }
}
