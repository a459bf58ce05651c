//! Ctrl-C for the commands that follow a run: listened for from the moment such a command
//! starts, so that an interrupt during the first request is handled too (and not the default
//! "kill the process").

/// Ctrl-C (SIGINT), once listening has started.
pub struct Interrupt {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Interrupt {
    /// Starts listening now: from here on Ctrl-C no longer kills the process, so every wait of
    /// the command must also wait for [`recv`](Self::recv). Must be called within the runtime.
    /// If the handler cannot be installed, Ctrl-C keeps its default effect.
    pub fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Self {
                signal: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        {
            Self {}
        }
    }

    /// Resolves at the next Ctrl-C.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        {
            let received = match &mut self.signal {
                Some(s) => s.recv().await.is_some(),
                None => false,
            };
            if !received {
                std::future::pending::<()>().await;
            }
        }
        #[cfg(not(unix))]
        {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}
