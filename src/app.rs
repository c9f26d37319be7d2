//! Wiring: load the config, build the shared state, bind listeners, start background tasks,
//! and shut down gracefully on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{Config, ConfigError};
use crate::listen::tls::TlsReloader;
use crate::listen::{self, Limits};
use crate::proxy::Proxy;
use crate::reload::{Reloader, Trigger};
use crate::runtime::{Shared, SnapshotError};

/// Why Meridian could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config file could not be read or failed validation.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The config could not be compiled (GeoIP databases, upstream TLS, residency, limits).
    #[error("{0}")]
    Snapshot(#[from] SnapshotError),
    /// The listener's certificate or key could not be loaded.
    #[error("TLS certificates: {0}")]
    Tls(#[from] crate::listen::tls::TlsError),
    /// A listener could not bind its address.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// The config key of the listener (`server.listen`, `admin.listen`, `server.tls_listen`).
        what: &'static str,
        /// The address it was asked to bind.
        addr: SocketAddr,
        /// The bind error (address in use, permission denied, ...).
        source: std::io::Error,
    },
}

/// A running Meridian: its bound addresses and a way to stop it.
pub struct Running {
    /// The cleartext proxy listener's bound address (the real port when configured with `:0`).
    pub listen: SocketAddr,
    /// The admin listener's bound address.
    pub admin: SocketAddr,
    /// The HTTPS listener's address, when `server.tls_listen` is set.
    pub tls_listen: Option<SocketAddr>,
    /// The certificates in force, reloaded as a `crate::reload::ReloadHook`.
    pub tls: Option<Arc<TlsReloader>>,
    pub(crate) shared: Arc<Shared>,
    /// Reloads the config; register a [`crate::reload::ReloadHook`] for state kept outside it.
    pub(crate) reloader: Arc<Reloader>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The admin listener outlives the others so `/readyz` answers 503 while draining.
    admin_shutdown: watch::Sender<bool>,
    admin_task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting, answers `/readyz` with 503, lets in-flight requests (streams
    /// included) finish up to `server.shutdown_timeout`, then stops the admin listener.
    pub async fn shutdown(self) {
        self.shared.draining.store(true, Ordering::Release);
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let _ = self.admin_shutdown.send(true);
        let _ = self.admin_task.await;
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    crate::listen::bind(addr).map_err(|source| StartError::Bind { what, addr, source })
}

/// Starts Meridian with a validated config: binds, spawns, returns once serving.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let listen_addr = config.server.listen;
    let admin_addr = config.admin.listen;
    let limits = Limits::from_config(&config.server);
    let tls_config = config.server.tls.clone();
    // Reloads put `[tracing]` changes in force too (`reload::Reloader`).
    if let Err(error) = crate::observe::trace::configure(config.tracing.as_ref()) {
        tracing::error!(%error, "tracing not started");
    }
    let shared = Shared::new(config)?;
    shared.metrics.config_reloads.with_label_values(&["success"]).inc();
    shared
        .metrics
        .config_last_reload_success
        .set(crate::observe::unix_now());
    let listener = bind("server.listen", listen_addr).await?;
    let admin = bind("admin.listen", admin_addr).await?;
    let running_listen = listener.local_addr().unwrap_or(listen_addr);
    let running_admin = admin.local_addr().unwrap_or(admin_addr);
    let (tx, rx) = watch::channel(false);
    let (admin_tx, admin_rx) = watch::channel(false);
    let proxy = Proxy::new(shared.clone());
    let reloader = Reloader::new(shared.clone());
    let mut tasks = Vec::with_capacity(4);
    let (mut tls, mut tls_listen) = (None, None);
    if let Some(t) = &tls_config {
        let certificates = TlsReloader::new(t)?;
        let acceptor = certificates.acceptor()?;
        let listener = bind("server.tls_listen", t.listen).await?;
        tls_listen = Some(listener.local_addr().unwrap_or(t.listen));
        tasks.push(tokio::spawn(listen::serve_tls(
            listener,
            proxy.clone(),
            limits.clone(),
            acceptor,
            rx.clone(),
        )));
        // Certificates reload with the config: on SIGHUP, and when their files change.
        certificates.count_reloads(shared.metrics.tls_reloads.clone());
        certificates.publish_expiries(&shared.metrics.tls_certificate_expiry);
        reloader.add_hook(certificates.clone());
        tls = Some(certificates);
    }
    tasks.push(tokio::spawn(listen::serve(listener, proxy, limits, rx.clone())));
    // Probes, time-based health transitions, and readiness after the first probe round.
    tasks.push(tokio::spawn(crate::probe::run(shared.clone(), rx.clone())));
    if reloader.path().is_some() {
        tasks.push(tokio::spawn(reloader.clone().watch_files(rx.clone())));
    }
    let admin_task = tokio::spawn(crate::admin::serve(admin, shared.clone(), admin_rx));
    let tls_shown = tls_listen.map_or_else(|| "off".to_string(), |a| a.to_string());
    tracing::info!(listen = %running_listen, admin = %running_admin, tls_listen = %tls_shown, "meridian serving");
    Ok(Running {
        listen: running_listen,
        admin: running_admin,
        tls_listen,
        tls,
        shared,
        reloader,
        shutdown: tx,
        tasks,
        admin_shutdown: admin_tx,
        admin_task,
    })
}

/// `meridian run`: serve until SIGTERM or SIGINT, reloading the config on SIGHUP.
pub async fn run(path: &Path) -> Result<(), StartError> {
    let config = Config::load(path)?;
    // Before serving: a SIGHUP sent as soon as the serving line appears must reload, not
    // kill the process with the default action.
    let mut signals = Signals::new();
    // Fixed at start like the listeners that apply it (a reload does not change it).
    let shutdown_timeout = config.server.shutdown_timeout;
    let running = start(config).await?;
    while signals.next().await == Signal::Reload {
        // Errors are logged and counted by the reloader; serving goes on either way.
        let _ = running.reloader.reload(Trigger::Signal).await;
    }
    // Not ready at once, but still serving: load balancers and kube-proxy take a few
    // seconds to stop sending, and connections they send meanwhile must not be refused.
    running.shared.draining.store(true, Ordering::Release);
    let delay = running.shared.snapshot().config.server.shutdown_delay;
    if !delay.is_zero() {
        tracing::info!(delay = ?delay, "stop signal: /readyz answers 503, still serving for the shutdown delay");
        let deadline = tokio::time::Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                signal = signals.next() => match signal {
                    Signal::Reload => { let _ = running.reloader.reload(Trigger::Signal).await; }
                    Signal::Stop => {
                        tracing::warn!("second stop signal: skipping the rest of the shutdown delay");
                        break;
                    }
                },
            }
        }
    }
    tracing::info!(
        timeout_ms = crate::observe::fields::ms(shutdown_timeout),
        "shutting down: no new connections, draining in-flight requests"
    );
    let drain = running.shutdown();
    tokio::pin!(drain);
    loop {
        tokio::select! {
            _ = &mut drain => break,
            signal = signals.next() => if signal == Signal::Stop {
                // An operator insisting: the streams still open are cut.
                tracing::warn!("second stop signal: exiting without waiting for in-flight requests");
                break;
            },
        }
    }
    tracing::info!("stopped");
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    Reload,
    Stop,
}

/// SIGHUP, SIGTERM and SIGINT as a stream of [`Signal`]s.
struct Signals {
    #[cfg(unix)]
    streams: Option<[tokio::signal::unix::Signal; 3]>,
}

impl Signals {
    fn new() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let streams = match (
                signal(SignalKind::hangup()),
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(hup), Ok(term), Ok(int)) => Some([hup, term, int]),
                (hup, term, int) => {
                    let error = [hup.err(), term.err(), int.err()].into_iter().flatten().next();
                    tracing::warn!(
                        error = error.as_ref().map(tracing::field::display),
                        "cannot install signal handlers; only Ctrl-C stops the process"
                    );
                    None
                }
            };
            Signals { streams }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        if let Some([hup, term, int]) = self.streams.as_mut() {
            return tokio::select! {
                _ = hup.recv() => Signal::Reload,
                _ = term.recv() => Signal::Stop,
                _ = int.recv() => Signal::Stop,
            };
        }
        let _ = tokio::signal::ctrl_c().await;
        Signal::Stop
    }
}
