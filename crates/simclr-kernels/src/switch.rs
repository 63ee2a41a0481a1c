//! Process-wide switches between two implementations of one op (for comparisons: benchmarks
//! flip them in one process, `SIMCLR_*` environment variables from outside).

use std::sync::atomic::{AtomicU8, Ordering};

/// A small setting read from an environment variable when first asked, unless a setter got there
/// first. Values are codes below 255 chosen by the owner.
pub(crate) struct Switch {
    /// 0 until decided, else the code plus one.
    cell: AtomicU8,
    var: &'static str,
}

impl Switch {
    pub(crate) const fn new(var: &'static str) -> Self {
        Self {
            cell: AtomicU8::new(0),
            var,
        }
    }

    /// The code: as set, else `from_env` of the variable's value (`None` when unset).
    pub(crate) fn get(&self, from_env: impl FnOnce(Option<String>) -> u8) -> u8 {
        match self.cell.load(Ordering::Relaxed) {
            0 => {
                let code = from_env(std::env::var(self.var).ok());
                // An explicit choice made meanwhile by another thread wins.
                let _ =
                    self.cell
                        .compare_exchange(0, code + 1, Ordering::Relaxed, Ordering::Relaxed);
                self.cell.load(Ordering::Relaxed) - 1
            }
            stored => stored - 1,
        }
    }

    pub(crate) fn set(&self, code: u8) {
        self.cell.store(code + 1, Ordering::Relaxed);
    }
}
