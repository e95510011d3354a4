//! Waiting for the process to be asked to stop, so that a service can leave the registry before
//! it goes: an orchestrator sends SIGTERM, a person at a terminal SIGINT.

use std::fmt;

/// Which request to stop arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Signal {
    /// SIGINT, or Ctrl-C where there are no Unix signals.
    Interrupt,
    /// SIGTERM.
    Terminate,
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
        })
    }
}

/// Completes when the process receives SIGINT or SIGTERM (Ctrl-C where there are no Unix
/// signals), and says which. From the first poll on, those signals no longer end the process
/// by themselves, so start waiting (spawn it) before registering: a signal that arrives in
/// between would otherwise kill the process with its instance still registered.
///
/// Fails only if the signal handlers cannot be installed.
pub async fn shutdown_signal() -> std::io::Result<Signal> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        tokio::select! {
            _ = interrupt.recv() => Ok(Signal::Interrupt),
            _ = terminate.recv() => Ok(Signal::Terminate),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await?;
        Ok(Signal::Interrupt)
    }
}
