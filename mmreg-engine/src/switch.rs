//! A process-wide switch read from an environment variable once, which tests and benchmarks may set.

use std::sync::atomic::{AtomicU8, Ordering};

/// A process-wide switch, set by a function or else read from its environment variable.
pub(crate) struct Switch {
    /// 0: undecided; 1: off; 2: on.
    state: AtomicU8,
    var: &'static str,
    default_on: bool,
}

impl Switch {
    /// Off unless the variable is `1`.
    pub(crate) const fn new(var: &'static str) -> Self {
        Switch {
            state: AtomicU8::new(0),
            var,
            default_on: false,
        }
    }

    /// On unless the variable is `0` (or empty).
    pub(crate) const fn on_by_default(var: &'static str) -> Self {
        Switch {
            default_on: true,
            ..Switch::new(var)
        }
    }

    pub(crate) fn get(&self) -> bool {
        if self.state.load(Ordering::Relaxed) == 0 {
            let on = match std::env::var(self.var) {
                Ok(v) if self.default_on => !v.is_empty() && v != "0",
                Ok(v) => v == "1",
                Err(_) => self.default_on,
            };
            let decided = 1 + u8::from(on);
            let _ = (self.state).compare_exchange(0, decided, Ordering::Relaxed, Ordering::Relaxed);
        }
        self.state.load(Ordering::Relaxed) == 2
    }

    pub(crate) fn set(&self, on: bool) {
        self.state.store(1 + u8::from(on), Ordering::Relaxed);
    }
}
