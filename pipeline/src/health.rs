//! Readiness of the process: set by the mode as it starts and stops, read by `/readyz`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Readiness, set by the mode as it starts and stops.
#[derive(Debug)]
pub struct Health {
    ready: AtomicBool,
    reason: Mutex<String>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            ready: AtomicBool::new(false),
            reason: Mutex::new("starting".into()),
        }
    }
}

impl Health {
    /// Edges connected, output writable: traffic may come.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn set_not_ready(&self, reason: &str) {
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = reason.to_string();
        self.ready.store(false, Ordering::Release);
    }

    /// `Ok` when ready, else why not.
    pub fn check(&self) -> Result<(), String> {
        if self.ready.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(self
                .reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone())
        }
    }
}
