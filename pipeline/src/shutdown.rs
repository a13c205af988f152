//! Explicit shutdown (the mini-redis pattern): one trigger, many listeners.
//!
//! The first SIGINT/SIGTERM triggers an orderly stop: capture stops taking events, every edge drains,
//! open windows flush and files are committed. A second signal exits at once; committed files are never
//! touched by that, and files being written are only ever temporary names.

use tokio::sync::watch;

/// Fires the shutdown.
#[derive(Clone, Debug)]
pub struct Trigger(watch::Sender<bool>);

/// Observes the shutdown.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

/// A trigger and a listener; clone the listener for each task.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown is triggered (at once if it already was).
    pub async fn wait(&mut self) {
        // An error means every trigger is gone: nobody can ask for shutdown any more, so never resolve.
        if self.0.wait_for(|&v| v).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Triggers shutdown on the first SIGINT or SIGTERM; exits the process on the second.
pub fn on_signals(trigger: Trigger) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        for round in 0.. {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            if round == 0 {
                tracing::info!("shutdown requested: draining edges and committing files (signal again to force)");
                trigger.trigger();
            } else {
                tracing::warn!("second signal: exiting now; committed files are intact, open ones are discarded");
                std::process::exit(130);
            }
        }
    });
    Ok(())
}
