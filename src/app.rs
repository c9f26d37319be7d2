//! Wiring: load the config, build the shared state, bind listeners, start background tasks,
//! and shut down gracefully on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{Config, ConfigError};
use crate::listen::{self, Limits};
use crate::proxy::Proxy;
use crate::runtime::{RuntimeError, Shared};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Runtime(#[from] RuntimeError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running Meridian: its bound addresses and a way to stop it.
pub struct Running {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (up to `shutdown_timeout`), returns.
    pub async fn shutdown(self) {
        self.shared.draining.store(true, Ordering::Release);
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

/// Starts Meridian with a validated config: binds, spawns, returns once serving.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let listen_addr = config.server.listen;
    let admin_addr = config.admin.listen;
    let limits = Limits::from_config(&config.server);
    let shared = Shared::new(config)?;
    shared.metrics.config_reloads.with_label_values(&["success"]).inc();
    shared.metrics.config_last_reload_success.set(unix_now());
    let listener = bind("server.listen", listen_addr).await?;
    let admin = bind("admin.listen", admin_addr).await?;
    let running_listen = listener.local_addr().unwrap_or(listen_addr);
    let running_admin = admin.local_addr().unwrap_or(admin_addr);
    let (tx, rx) = watch::channel(false);
    let proxy = Proxy::new(shared.clone());
    let tasks = vec![
        tokio::spawn(listen::serve(listener, proxy, limits, rx.clone())),
        tokio::spawn(crate::admin::serve(admin, shared.clone(), rx.clone())),
        // Probes, time-based health transitions, and readiness after the first probe round.
        tokio::spawn(crate::health::probe::run(shared.clone(), rx.clone())),
    ];
    tracing::info!(listen = %running_listen, admin = %running_admin, "meridian serving");
    Ok(Running {
        listen: running_listen,
        admin: running_admin,
        shared,
        shutdown: tx,
        tasks,
    })
}

/// `meridian run`: serve until SIGTERM or SIGINT.
pub async fn run(path: &Path) -> Result<(), StartError> {
    let config = Config::load(path)?;
    let running = start(config).await?;
    wait_for_signal().await;
    tracing::info!("shutting down: draining connections");
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
