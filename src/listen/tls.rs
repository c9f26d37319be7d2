//! TLS termination: certificates chosen by SNI (exact names, then `*.` wildcards, then the
//! default), held in an `ArcSwap` so a reload changes what new handshakes see without
//! touching open connections. Reloads come through the config reloader's hook (SIGHUP, a
//! change of the config or of a certificate file) or a direct [`TlsReloader::reload`].
//!
//! The crypto provider is `ring`: it builds with nothing but a Rust toolchain (no C
//! compiler, cmake or NASM as `aws-lc-rs` needs), keeps the binary and the build smaller,
//! and covers what an edge needs (TLS 1.2 and 1.3, ECDSA, Ed25519 and RSA certificates).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;
use prometheus::IntCounterVec;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::{Problem, TlsConfig};
use crate::reload::{Prepared, ReloadHook, Trigger};
use crate::runtime::Snapshot;

/// ALPN protocols offered to clients, in preference order.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why a certificate set could not be loaded; the set in force stays.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read or holds no valid PEM.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file that failed.
        path: PathBuf,
        /// The PEM reader's error.
        source: rustls_pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("{path} holds no PEM certificate")]
    NoCertificate {
        /// The certificate file.
        path: PathBuf,
    },
    /// The private key does not fit the certificate (or is of an unsupported kind).
    #[error("key {key} does not fit certificate {cert}: {source}")]
    Key {
        /// The certificate chain file.
        cert: PathBuf,
        /// The private key file.
        key: PathBuf,
        /// rustls' reason.
        source: rustls::Error,
    },
    /// rustls refused the server configuration (protocol versions or crypto provider).
    #[error("TLS setup: {0}")]
    Setup(#[source] rustls::Error),
}

/// Values by server name: exact names and one-label wildcards (`*.example.com`).
#[derive(Debug, Clone)]
pub(crate) struct Names<V> {
    exact: HashMap<String, V>,
    /// Keyed by the part after `*.`.
    wildcard: HashMap<String, V>,
}

impl<V> Default for Names<V> {
    fn default() -> Self {
        Names {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        }
    }
}

impl<V: Clone> Names<V> {
    /// Adds `name` unless an earlier entry claimed it (first one listed wins).
    pub(crate) fn insert(&mut self, name: &str, value: V) {
        let name = normalise(name);
        match name.strip_prefix("*.") {
            Some(suffix) => self.wildcard.entry(suffix.to_string()).or_insert(value),
            None => self.exact.entry(name).or_insert(value),
        };
    }

    /// The value for an SNI name: an exact match first, then a wildcard covering exactly
    /// one more label (as certificates do: `*.example.com` is not `a.b.example.com`).
    pub(crate) fn find(&self, sni: &str) -> Option<&V> {
        let sni = normalise(sni);
        if let Some(v) = self.exact.get(&sni) {
            return Some(v);
        }
        let (_, parent) = sni.split_once('.')?;
        self.wildcard.get(parent)
    }
}

fn normalise(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// One loaded certificate set.
#[derive(Debug)]
struct CertSet {
    default: Arc<CertifiedKey>,
    by_name: Names<Arc<CertifiedKey>>,
    /// Each certificate file with its leaf's `notAfter` (Unix seconds), for the expiry gauge.
    expiries: Vec<(String, Option<i64>)>,
}

/// The certificates in force, their source files, and the resolver rustls asks on every
/// handshake. Shared by the TLS listener and whoever reloads it.
pub struct TlsReloader {
    current: ArcSwap<CertSet>,
    files: Mutex<TlsConfig>,
    /// `meridian_tls_reloads_total`, once the process has metrics to count into.
    reloads: OnceLock<IntCounterVec>,
    /// `meridian_tls_certificate_expiry_timestamp_seconds`, likewise.
    expiry: OnceLock<prometheus::GaugeVec>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl fmt::Debug for TlsReloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsReloader").finish_non_exhaustive()
    }
}

impl TlsReloader {
    /// Loads every certificate in `config`; fails if any is unusable.
    pub fn new(config: &TlsConfig) -> Result<Arc<TlsReloader>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let set = load(config, &provider)?;
        Ok(Arc::new(TlsReloader {
            current: ArcSwap::from_pointee(set),
            files: Mutex::new(config.clone()),
            reloads: OnceLock::new(),
            expiry: OnceLock::new(),
            provider,
        }))
    }

    /// Re-reads the current files. On error the certificates in force stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let files = self.files();
        let set = load(&files, &self.provider)?;
        self.current.store(Arc::new(set));
        Ok(())
    }

    /// Switches to the files of a new config (config reload) and loads them. On error
    /// neither the files nor the certificates in force change. The listen address is not
    /// touched: moving it needs a restart.
    pub fn update(&self, config: &TlsConfig) -> Result<(), TlsError> {
        let set = load(config, &self.provider)?;
        self.install(config, set);
        Ok(())
    }

    /// Puts `set`, loaded from `config`'s files, in force.
    fn install(&self, config: &TlsConfig, set: CertSet) {
        *lock(&self.files) = config.clone();
        self.current.store(Arc::new(set));
    }

    /// Counts hook-driven reloads by result into `counter`.
    pub(crate) fn count_reloads(&self, counter: IntCounterVec) {
        let _ = self.reloads.set(counter);
    }

    /// Publishes the expiry of each certificate file in force into `gauge{certificate}`,
    /// now and after every reload.
    pub(crate) fn publish_expiries(&self, gauge: &prometheus::GaugeVec) {
        let _ = self.expiry.set(gauge.clone());
        self.republish();
    }

    /// Series of files no longer in force are dropped.
    fn republish(&self) {
        let Some(gauge) = self.expiry.get() else {
            return;
        };
        gauge.reset();
        for (path, expiry) in &self.current.load().expiries {
            if let Some(t) = expiry {
                gauge.with_label_values(&[path]).set(*t as f64);
            }
        }
    }

    fn files(&self) -> TlsConfig {
        lock(&self.files).clone()
    }

    /// A rustls server config that asks this reloader for a certificate on every handshake:
    /// TLS 1.3 and 1.2, ALPN h2 then http/1.1.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(TlsError::Setup)?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    pub(crate) fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, TlsError> {
        Ok(TlsAcceptor::from(self.server_config()?))
    }
}

impl ResolvesServerCert for TlsReloader {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.current.load();
        let chosen = hello
            .server_name()
            .and_then(|name| set.by_name.find(name))
            .unwrap_or(&set.default);
        Some(chosen.clone())
    }
}

/// Certificates reload with the config: after every reload attempt (a rejected config
/// included, since its certificate files may still have changed) the files named by the
/// config in force are read again; the reloader also watches them for changes.
impl ReloadHook for TlsReloader {
    fn watched_files(&self, runtime: &Snapshot) -> Vec<PathBuf> {
        runtime
            .config
            .server
            .tls
            .as_ref()
            .map(|t| file_paths(t).into_iter().map(Path::to_path_buf).collect())
            .unwrap_or_default()
    }

    fn vet(&self, config: &crate::config::Config) -> Result<Option<Prepared>, Vec<Problem>> {
        match &config.server.tls {
            // The loaded set is what `reloaded` installs if this config goes into force.
            Some(tls) => match load(tls, &self.provider) {
                Ok(set) => Ok(Some(Box::new(set))),
                Err(e) => Err(config_problems(tls, &e)),
            },
            None => Ok(None),
        }
    }

    fn reloaded(&self, runtime: &Arc<Snapshot>, trigger: Trigger, prepared: Option<Prepared>) {
        // Without `tls_listen` now the listener still runs until a restart: keep its set.
        let Some(config) = runtime.config.server.tls.as_ref() else {
            return;
        };
        // The set vetted with the config now in force, not the files read again: one that
        // broke since would leave the new config beside the old certificates. Without one
        // (a rejected config, whose files may still have changed), the files are read;
        // certificate files are a few KiB, cheaper inline than a hop to the blocking pool.
        let result = match prepared.and_then(|p| p.downcast::<CertSet>().ok()) {
            Some(set) => {
                self.install(config, *set);
                Ok(())
            }
            None => self.update(config),
        };
        self.republish();
        if let Some(counter) = self.reloads.get() {
            let label = if result.is_ok() { "success" } else { "error" };
            counter.with_label_values(&[label]).inc();
        }
        match result {
            Ok(()) => tracing::info!(trigger = trigger.as_str(), "TLS certificates reloaded"),
            Err(e) => tracing::error!(
                trigger = trigger.as_str(),
                error = %e,
                "TLS reload rejected; keeping the certificates in force"
            ),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn file_paths(config: &TlsConfig) -> Vec<&Path> {
    let mut paths = vec![config.cert.as_path(), config.key.as_path()];
    for c in &config.sni {
        paths.push(&c.cert);
        paths.push(&c.key);
    }
    paths
}

fn load(config: &TlsConfig, provider: &rustls::crypto::CryptoProvider) -> Result<CertSet, TlsError> {
    let leaf_expiry = |path: &Path, key: &CertifiedKey| {
        let expiry = key.cert.first().and_then(|c| crate::observe::cert_expiry::not_after(c));
        (path.display().to_string(), expiry)
    };
    let default = Arc::new(certified_key(&config.cert, &config.key, provider)?);
    let mut expiries = vec![leaf_expiry(&config.cert, &default)];
    let mut by_name = Names::default();
    for c in &config.sni {
        let key = Arc::new(certified_key(&c.cert, &c.key, provider)?);
        expiries.push(leaf_expiry(&c.cert, &key));
        for name in &c.names {
            by_name.insert(name, key.clone());
        }
    }
    Ok(CertSet {
        default,
        by_name,
        expiries,
    })
}

/// Why `tls` does not load (`error`, loading's first failure), for `check`, `run` and a
/// rejected reload: each pair that does not load with the key path of the file at fault, or
/// the TLS setup itself under `server.tls_listen` when every file loads alone.
pub fn config_problems(tls: &TlsConfig, error: &TlsError) -> Vec<Problem> {
    let each: Vec<Problem> = problems(tls)
        .into_iter()
        .map(|(key, e)| Problem::new(key, e.to_string()))
        .collect();
    if each.is_empty() {
        return vec![Problem::new("server.tls_listen", error.to_string())];
    }
    each
}

/// Every certificate and key pair that does not load, each with the key path of the file
/// at fault (`server.tls_cert`, `server.certificate[1].key`): `meridian check` reports them
/// all, where loading stops at the first.
pub fn problems(config: &TlsConfig) -> Vec<(String, TlsError)> {
    let provider = rustls::crypto::ring::default_provider();
    let default = (
        "server.tls_cert".to_string(),
        "server.tls_key".to_string(),
        &config.cert,
        &config.key,
    );
    let sni = config.sni.iter().enumerate().map(|(i, c)| {
        (
            format!("server.certificate[{i}].cert"),
            format!("server.certificate[{i}].key"),
            &c.cert,
            &c.key,
        )
    });
    let mut out = Vec::new();
    for (cert_key, key_key, cert, key) in std::iter::once(default).chain(sni) {
        if let Err(e) = certified_key(cert, key, &provider) {
            let at = match &e {
                TlsError::Read { path, .. } if path == cert => cert_key,
                TlsError::Read { .. } | TlsError::Key { .. } => key_key,
                TlsError::NoCertificate { .. } | TlsError::Setup(_) => cert_key,
            };
            out.push((at, e));
        }
    }
    out
}

/// Reads a PEM chain and its key and checks that they belong together.
pub(crate) fn certified_key(
    cert: &Path,
    key: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|source| TlsError::Read {
            path: cert.to_owned(),
            source,
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read {
            path: cert.to_owned(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: cert.to_owned() });
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Read {
        path: key.to_owned(),
        source,
    })?;
    CertifiedKey::from_der(chain, der, provider).map_err(|source| TlsError::Key {
        cert: cert.to_owned(),
        key: key.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::TestResult;

    #[test]
    fn names_match_exact_then_one_label_wildcards() {
        let mut names = Names::default();
        for (name, v) in [
            ("api.example.eu", "eu"),
            ("*.example.com", "wild"),
            ("exact.example.com", "exact"),
            ("*.example.com", "second wildcard loses"),
            ("API.example.eu", "second exact loses"),
        ] {
            names.insert(name, v);
        }
        let cases = [
            ("api.example.eu", Some("eu")),
            ("API.Example.EU.", Some("eu")),
            ("exact.example.com", Some("exact")),
            ("a.example.com", Some("wild")),
            ("example.com", None),
            ("a.b.example.com", None),
            ("example.eu", None),
            ("localhost", None),
            ("", None),
        ];
        for (sni, want) in cases {
            assert_eq!(names.find(sni).copied(), want, "{sni:?}");
        }
    }

    fn write_pair(dir: &Path, stem: &str, names: &[&str]) -> Result<(PathBuf, PathBuf), Box<dyn std::error::Error>> {
        let key = rcgen::KeyPair::generate()?;
        let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        let cert = params.self_signed(&key)?;
        let (c, k) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}.key")));
        std::fs::write(&c, cert.pem())?;
        std::fs::write(&k, key.serialize_pem())?;
        Ok((c, k))
    }

    #[test]
    fn a_bad_reload_keeps_the_set_in_force() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (cert, key) = write_pair(dir.path(), "default", &["localhost"])?;
        let (_, other_key) = write_pair(dir.path(), "other", &["other"])?;
        let config = TlsConfig {
            listen: "127.0.0.1:0".parse()?,
            cert: cert.clone(),
            key: key.clone(),
            sni: Vec::new(),
        };
        let reloader = TlsReloader::new(&config)?;
        let before = reloader.current.load_full();

        std::fs::write(&cert, "not a certificate")?;
        assert!(matches!(reloader.reload(), Err(TlsError::NoCertificate { .. })));
        assert!(Arc::ptr_eq(&before, &reloader.current.load_full()));

        // A key from another pair is refused too.
        write_pair(dir.path(), "default", &["localhost"])?;
        let mismatched = TlsConfig {
            key: other_key,
            ..config.clone()
        };
        assert!(matches!(reloader.update(&mismatched), Err(TlsError::Key { .. })));
        assert!(Arc::ptr_eq(&before, &reloader.current.load_full()));

        reloader.reload()?;
        assert!(!Arc::ptr_eq(&before, &reloader.current.load_full()));
        Ok(())
    }

    #[test]
    fn a_reload_installs_the_certificates_it_vetted() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (old_cert, old_key) = write_pair(dir.path(), "old", &["localhost"])?;
        let (cert, key) = write_pair(dir.path(), "new", &["localhost"])?;
        let reloader = TlsReloader::new(&TlsConfig {
            listen: "127.0.0.1:0".parse()?,
            cert: old_cert,
            key: old_key,
            sni: Vec::new(),
        })?;
        let server = format!(
            "[server]\ntls_listen = \"127.0.0.1:0\"\ntls_cert = {:?}\ntls_key = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        );
        let config = crate::test_fixtures::world_config(&server);
        let vetted = reloader.vet(&config).map_err(|p| format!("{p:?}"))?;
        let new_leaf = CertificateDer::pem_file_iter(&cert)?.next().ok_or("no certificate")??;

        // The new files break between the vetting and the install: the vetted set goes in.
        std::fs::write(&cert, "not a certificate")?;
        let runtime = crate::runtime::Shared::new(config)?.snapshot();
        reloader.reloaded(&runtime, Trigger::Request, vetted);
        assert_eq!(reloader.current.load().default.cert[0], new_leaf);
        assert_eq!(reloader.files().cert, cert, "the new files are the ones watched");

        // Nothing vetted (a rejected config): the files are read again, and a broken one
        // changes nothing.
        let before = reloader.current.load_full();
        reloader.reloaded(&runtime, Trigger::Request, None);
        assert!(Arc::ptr_eq(&before, &reloader.current.load_full()));
        Ok(())
    }
}
