//! Config hot reload: a signal, a file change or a caller asks; the file is validated, a new
//! runtime is built over the surviving health state and swapped in, or the old one stays.
//!
//! Files are watched by polling a content hash once a second rather than with inotify: it
//! needs no extra dependency, sees atomic rename-over writes (editors, Kubernetes ConfigMap
//! symlink swaps) that a watch on the old inode misses, ignores `touch`, and costs one read
//! of a few small files per second. A change is acted on once the content has stayed the
//! same for [`SETTLE`], so a half-written file is not loaded.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{Config, ConfigError, Problem, Source, geoip_problems};
use crate::runtime::{Shared, Snapshot, SnapshotError};

/// How often watched files are checked.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long a changed file must stay unchanged before it is loaded.
pub(crate) const SETTLE: Duration = Duration::from_millis(250);
/// Changes in a row after which a file that never settles is loaded anyway.
const MAX_SETTLE_ROUNDS: u32 = 8;

/// What asked for a reload; logged and passed to hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trigger {
    /// `SIGHUP`.
    Signal,
    /// The config file or a hook's file changed.
    FileChange,
    /// A test called [`Reloader::reload`].
    #[cfg(test)]
    Request,
}

impl Trigger {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "sighup",
            Trigger::FileChange => "file_change",
            #[cfg(test)]
            Trigger::Request => "request",
        }
    }
}

/// What a hook's `vet` made of the config it accepted (TLS: the loaded certificates). It is
/// handed back to `reloaded` when that config goes into force, so what was vetted is what
/// is installed: loading the files again could find them changed in between.
pub(crate) type Prepared = Box<dyn std::any::Any + Send>;

/// Something reloaded alongside the config but not held in it, e.g. TLS certificates:
/// their files are watched too, and the hook runs after every reload attempt.
pub(crate) trait ReloadHook: Send + Sync {
    /// Files whose change should trigger a reload, for the runtime in force.
    fn watched_files(&self, _runtime: &Snapshot) -> Vec<PathBuf> {
        Vec::new()
    }

    /// Vets what a new config names before it is put in force (its certificates load): an
    /// error rejects the whole reload, so the config in force is always one a restart
    /// would accept, never new routes beside the old certificates. Each problem names the
    /// key at fault; the reload's error adds its line.
    fn vet(&self, _config: &Config) -> Result<Option<Prepared>, Vec<Problem>> {
        Ok(None)
    }

    /// Runs after every reload attempt with the runtime now in force: the new one, or the
    /// old one when the config was rejected (files it names may still have changed).
    /// `prepared`: what `vet` returned for the config just put in force; `None` after a
    /// rejected reload.
    fn reloaded(&self, runtime: &Arc<Snapshot>, trigger: Trigger, prepared: Option<Prepared>);
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ReloadError {
    #[error("no config file to reload: the config was not loaded from a file")]
    NoSource,
    #[error("{}", .0.to_string().trim_end())]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Snapshot(#[from] SnapshotError),
    #[error("the reload task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What a successful reload changed that only a restart applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reloaded {
    pub(crate) restart_needed: Vec<&'static str>,
}

/// Reloads the config of one running Meridian; shared by the signal handler, the file
/// watcher and anyone holding it (see [`ReloadHook`]).
pub(crate) struct Reloader {
    shared: Arc<Shared>,
    path: Option<PathBuf>,
    /// The config the listeners were started with: what a restart would change is judged
    /// against it, so the warning repeats until the process is restarted.
    boot: Arc<Config>,
    /// One reload at a time: a signal and a file change arriving together must not
    /// interleave build and install.
    serial: tokio::sync::Mutex<()>,
    hooks: Mutex<Vec<Arc<dyn ReloadHook>>>,
    /// Fingerprints of the watched files as of the last reload.
    seen: Mutex<Fingerprints>,
}

type Fingerprints = Vec<(PathBuf, Option<u64>)>;

impl Reloader {
    pub(crate) fn new(shared: Arc<Shared>) -> Arc<Reloader> {
        let runtime = shared.snapshot();
        let path = runtime.config.source.clone();
        let reloader = Reloader {
            shared,
            path,
            boot: runtime.config.clone(),
            serial: tokio::sync::Mutex::new(()),
            hooks: Mutex::new(Vec::new()),
            seen: Mutex::new(Vec::new()),
        };
        *lock(&reloader.seen) = fingerprint_all(reloader.watched(&runtime));
        Arc::new(reloader)
    }

    /// The config file reloads read, if the config came from one.
    pub(crate) fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Registers a hook; its files are watched from now on.
    pub(crate) fn add_hook(&self, hook: Arc<dyn ReloadHook>) {
        lock(&self.hooks).push(hook);
        *lock(&self.seen) = fingerprint_all(self.watched(&self.shared.snapshot()));
    }

    /// Validates the config file, builds a runtime over the surviving health state and puts
    /// it in force. On any error the runtime in force stays, and the error is logged and
    /// counted. Hooks run either way.
    pub(crate) async fn reload(&self, trigger: Trigger) -> Result<Reloaded, ReloadError> {
        let _serial = self.serial.lock().await;
        // Taken before anything is read: a write racing this reload is still a change on
        // the next poll.
        let before = self.current_fingerprints().await.unwrap_or_default();
        self.reload_locked(trigger, before).await
    }

    /// Reloads if a watched file differs from what the last reload saw; `None` when a
    /// reload from another trigger has already loaded the change.
    async fn reload_if_changed(&self) -> Option<Result<Reloaded, ReloadError>> {
        let _serial = self.serial.lock().await;
        let before = self.current_fingerprints().await?;
        let changed = changed_files(&lock(&self.seen), &before);
        if changed.is_empty() {
            return None;
        }
        tracing::info!(files = %crate::observe::fields::joined(&changed), "watched file changed; reloading");
        Some(self.reload_locked(Trigger::FileChange, before).await)
    }

    async fn reload_locked(&self, trigger: Trigger, before: Fingerprints) -> Result<Reloaded, ReloadError> {
        // One list for the whole attempt: each hook gets back what it vetted.
        let hooks: Vec<_> = lock(&self.hooks).clone();
        let (result, mut prepared) = match self.reload_config(hooks.clone()).await {
            Ok((done, prepared)) => (Ok(done), prepared),
            Err(e) => (Err(e), Vec::new()),
        };
        let metrics = &self.shared.metrics;
        match &result {
            Ok(done) => {
                metrics.config_reloads.with_label_values(&["success"]).inc();
                metrics.config_last_reload_success.set(crate::observe::unix_now());
                let rt = self.shared.snapshot();
                tracing::info!(
                    trigger = trigger.as_str(),
                    config = %self.path.as_deref().unwrap_or(Path::new("-")).display(),
                    regions = rt.regions.len(),
                    "config reloaded"
                );
                for key in &done.restart_needed {
                    tracing::warn!(
                        key = *key,
                        "config change needs a restart to take effect; ignored until then"
                    );
                }
            }
            Err(e) => {
                metrics.config_reloads.with_label_values(&["error"]).inc();
                tracing::error!(
                    trigger = trigger.as_str(),
                    error = %e,
                    "config reload rejected; the previous config stays in force"
                );
            }
        }
        let runtime = self.shared.snapshot();
        for (at, hook) in hooks.iter().enumerate() {
            hook.reloaded(&runtime, trigger, prepared.get_mut(at).and_then(Option::take));
        }
        // The new runtime may name other files (a new certificate path): those are
        // fingerprinted now, the rest keep their value from before the reload.
        let after = self.current_fingerprints().await.unwrap_or_default();
        *lock(&self.seen) = after
            .into_iter()
            .map(|(path, now)| match before.iter().find(|(p, _)| *p == path) {
                Some((_, then)) => (path, *then),
                None => (path, now),
            })
            .collect();
        result
    }

    /// Reads, vets and installs the config; with what each of `hooks` prepared for it.
    async fn reload_config(
        &self,
        hooks: Vec<Arc<dyn ReloadHook>>,
    ) -> Result<(Reloaded, Vec<Option<Prepared>>), ReloadError> {
        let path = self.path.clone().ok_or(ReloadError::NoSource)?;
        let shared = self.shared.clone();
        let boot = self.boot.clone();
        // Reading, validating and (for a new GeoIP file) loading a database is blocking
        // work: keep it off the request workers.
        let reloaded = tokio::task::spawn_blocking(move || {
            let source = Source::read(&path)?;
            let config = source.config()?;
            // A file the config names that does not load is told as `meridian check` tells
            // it: the line and key that name it, then why.
            let prepared = hooks
                .iter()
                .map(|hook| hook.vet(&config).map_err(|problems| source.error(problems)))
                .collect::<Result<Vec<_>, _>>()?;
            let restart_needed = restart_needed(&boot, &config);
            let previous = shared.snapshot();
            let runtime = match shared.build(config, Some(&previous)) {
                Ok(runtime) => runtime,
                // The config went into the failed build: read again to find the file's line.
                Err(SnapshotError::Geo(e)) => match source.config() {
                    Ok(config) => return Err(source.error(geoip_problems(&config, &e)).into()),
                    Err(_) => return Err(SnapshotError::Geo(e).into()),
                },
                Err(e) => return Err(e.into()),
            };
            shared.install(runtime);
            Ok::<_, ReloadError>((Reloaded { restart_needed }, prepared))
        })
        .await??;
        // On the runtime: a new exporter is a task. A collector client that cannot be built
        // leaves tracing as it was; the rest of the config is in force.
        if let Err(error) = crate::observe::trace::configure(self.shared.snapshot().config.tracing.as_ref()) {
            tracing::error!(%error, "tracing config not applied");
        }
        Ok(reloaded)
    }

    /// Watches the config file and the hooks' files until `shutdown`, reloading on change.
    pub(crate) async fn watch_files(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
            let Some(mut current) = self.current_fingerprints().await else {
                continue;
            };
            if current == *lock(&self.seen) {
                continue;
            }
            for _ in 0..MAX_SETTLE_ROUNDS {
                tokio::select! {
                    _ = tokio::time::sleep(SETTLE) => {}
                    _ = shutdown.changed() => return,
                }
                let Some(again) = self.current_fingerprints().await else {
                    break;
                };
                if again == current {
                    break;
                }
                current = again;
            }
            let _ = self.reload_if_changed().await;
        }
    }

    /// Fingerprints of the files watched for the runtime in force, read off the workers.
    async fn current_fingerprints(&self) -> Option<Fingerprints> {
        let files = self.watched(&self.shared.snapshot());
        tokio::task::spawn_blocking(move || fingerprint_all(files)).await.ok()
    }

    /// The config file first, the GeoIP database files, then every hook's files.
    fn watched(&self, runtime: &Snapshot) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.path.iter().cloned().collect();
        files.extend(runtime.config.geoip.databases.iter().cloned());
        for hook in lock(&self.hooks).iter() {
            files.extend(hook.watched_files(runtime));
        }
        files
    }
}

fn fingerprint_all(files: Vec<PathBuf>) -> Fingerprints {
    files
        .into_iter()
        .map(|p| {
            let f = fingerprint(&p);
            (p, f)
        })
        .collect()
}

/// Above this size a file is fingerprinted by size and modification time, not content:
/// hashing a 30 MB city database every second would cost more than the reload it saves.
const HASH_LIMIT: u64 = 1 << 20;

/// A hash of the file's content (of its size and modification time when large); `None`
/// when it cannot be read (missing, mid-swap).
fn fingerprint(path: &Path) -> Option<u64> {
    let mut h = DefaultHasher::new();
    let meta = std::fs::metadata(path).ok()?;
    if meta.len() > HASH_LIMIT {
        (meta.len(), meta.modified().ok()).hash(&mut h);
        return Some(h.finish());
    }
    let bytes = std::fs::read(path).ok()?;
    bytes.hash(&mut h);
    Some(h.finish())
}

fn changed_files(before: &Fingerprints, now: &Fingerprints) -> Vec<String> {
    now.iter()
        .filter(|(path, f)| !before.iter().any(|(p, b)| p == path && b == f))
        .map(|(p, _)| p.display().to_string())
        .collect()
}

/// Key paths whose new value only takes effect on restart: bound sockets, per-connection
/// limits fixed when the listeners started, the thread pool and the log format.
pub(crate) fn restart_needed(running: &Config, new: &Config) -> Vec<&'static str> {
    let (a, b) = (&running.server, &new.server);
    let tls_listen = |c: &Config| c.server.tls.as_ref().map(|t| t.listen);
    [
        ("server.listen", a.listen != b.listen),
        ("server.tls_listen", tls_listen(running) != tls_listen(new)),
        ("server.proxy_protocol", a.proxy_protocol != b.proxy_protocol),
        ("admin.listen", running.admin.listen != new.admin.listen),
        ("server.max_connections", a.max_connections != b.max_connections),
        ("server.max_header_bytes", a.max_header_bytes != b.max_header_bytes),
        ("server.max_headers", a.max_headers != b.max_headers),
        (
            "server.header_read_timeout",
            a.header_read_timeout != b.header_read_timeout,
        ),
        ("server.idle_timeout", a.idle_timeout != b.idle_timeout),
        (
            "server.http2_max_concurrent_streams",
            a.http2_max_concurrent_streams != b.http2_max_concurrent_streams,
        ),
        ("server.shutdown_timeout", a.shutdown_timeout != b.shutdown_timeout),
        ("server.worker_threads", a.worker_threads != b.worker_threads),
        ("log.format", running.log.format != new.log.format),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded values are plain data: a panic elsewhere leaves them usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[server]
listen = "127.0.0.1:8080"
[admin]
listen = "127.0.0.1:9901"
[[region]]
name = "us-east"
location = [39.04, -77.49]
countries = ["US"]
endpoints = ["http://127.0.0.1:9"]
"#;

    fn parse(text: &str) -> Config {
        Config::parse(text, None).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn restart_needed_names_what_only_a_restart_applies() {
        let cases: &[(&str, &str, &[&str])] = &[
            ("same text", BASE, &[]),
            ("a country moves", &BASE.replace(r#"["US"]"#, r#"["US", "CA"]"#), &[]),
            (
                "timeouts read per request",
                &BASE.replace("[server]\n", "[server]\nrequest_timeout = \"5s\"\n"),
                &[],
            ),
            (
                "listener moves",
                &BASE.replace("127.0.0.1:8080", "127.0.0.1:8081"),
                &["server.listen"],
            ),
            (
                "admin moves",
                &BASE.replace("127.0.0.1:9901", "127.0.0.1:9902"),
                &["admin.listen"],
            ),
            (
                "limits and log format",
                &format!(
                    "{}[log]\nformat = \"json\"\n",
                    BASE.replace(
                        "[server]\n",
                        "[server]\nmax_connections = 5\nshutdown_timeout = \"1s\"\n"
                    )
                ),
                &["server.max_connections", "server.shutdown_timeout", "log.format"],
            ),
        ];
        let running = parse(BASE);
        for (what, text, want) in cases {
            assert_eq!(restart_needed(&running, &parse(text)), *want, "{what}");
        }
    }

    struct Recorder {
        file: PathBuf,
        calls: Mutex<Vec<Trigger>>,
    }

    impl ReloadHook for Recorder {
        fn watched_files(&self, _runtime: &Snapshot) -> Vec<PathBuf> {
            vec![self.file.clone()]
        }

        fn reloaded(&self, _runtime: &Arc<Snapshot>, trigger: Trigger, _prepared: Option<Prepared>) {
            lock(&self.calls).push(trigger);
        }
    }

    #[tokio::test]
    async fn hooks_run_after_reloads_and_their_files_are_watched() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("meridian.toml");
        let text = BASE
            .replace("127.0.0.1:8080", "127.0.0.1:0")
            .replace("127.0.0.1:9901", "127.0.0.1:0");
        std::fs::write(&path, &text).unwrap_or_else(|e| panic!("{e}"));
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, "one").unwrap_or_else(|e| panic!("{e}"));
        let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let running = crate::app::start(config).await.unwrap_or_else(|e| panic!("{e}"));
        let hook = Arc::new(Recorder {
            file: cert.clone(),
            calls: Mutex::new(Vec::new()),
        });
        running.reloader.add_hook(hook.clone());

        let done = running.reloader.reload(Trigger::Request).await;
        assert_eq!(done.ok(), Some(Reloaded { restart_needed: vec![] }));
        assert_eq!(*lock(&hook.calls), vec![Trigger::Request]);

        // Only the hook's file changes: a reload runs, so the hook re-reads it.
        std::fs::write(&cert, "two").unwrap_or_else(|e| panic!("{e}"));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while lock(&hook.calls).len() < 2 {
            assert!(std::time::Instant::now() < deadline, "certificate change not seen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(*lock(&hook.calls), vec![Trigger::Request, Trigger::FileChange]);
        let successes = running
            .shared
            .metrics
            .config_reloads
            .with_label_values(&["success"])
            .get();
        assert_eq!(successes, 3, "start-up, the request, the file change");
        running.shutdown().await;
    }

    #[test]
    fn changed_files_lists_new_changed_and_vanished_content() {
        let p = |s: &str| PathBuf::from(s);
        let before = vec![(p("a"), Some(1)), (p("b"), Some(2)), (p("c"), Some(3))];
        let now = vec![(p("a"), Some(1)), (p("b"), Some(5)), (p("c"), None), (p("d"), Some(4))];
        assert_eq!(changed_files(&before, &now), vec!["b", "c", "d"]);
        assert!(changed_files(&before, &before).is_empty());
    }

    #[test]
    fn fingerprint_follows_content_not_touches() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("f");
        assert_eq!(fingerprint(&path), None);
        std::fs::write(&path, "one").unwrap_or_else(|e| panic!("{e}"));
        let one = fingerprint(&path);
        std::fs::write(&path, "one").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(fingerprint(&path), one);
        std::fs::write(&path, "two").unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(fingerprint(&path), one);
    }
}
