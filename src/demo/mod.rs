//! `meridian demo`: six fake inference regions on loopback, the proxy in front, and the
//! curl commands to try.

pub(crate) mod upstream;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::config::Config;
use upstream::DemoUpstream;

/// The demo's regions: name, location, home countries.
pub(crate) const REGIONS: [(&str, [f64; 2], &[&str]); 6] = [
    ("us-east", [39.04, -77.49], &["US", "CA"]),
    ("us-west", [45.60, -121.18], &["MX"]),
    ("eu-west", [53.35, -6.26], &["IE", "FR", "NL", "BE"]),
    ("eu-central", [50.11, 8.68], &["DE", "AT", "CH", "PL"]),
    ("uk-south", [51.51, -0.13], &["GB"]),
    ("ap-southeast", [1.35, 103.82], &["SG", "AU", "NZ", "JP"]),
];

/// The demo's admin token, printed with the drill commands.
pub const TOKEN: &str = "demo-token";

/// The config text for the demo, with each region pointing at its fake endpoint. With city
/// databases the US is no region's home, so its clients go to the nearer coast.
pub(crate) fn config_text(listen: SocketAddr, admin: SocketAddr, endpoints: &[String], geoip: &[PathBuf]) -> String {
    let database = if geoip.is_empty() {
        String::new()
    } else {
        let files: Vec<String> = geoip
            .iter()
            .map(|p| format!("{:?}", absolute(p).display().to_string()))
            .collect();
        format!("database = [{}]\n", files.join(", "))
    };
    let mut s = format!(
        r#"[server]
listen = "{listen}"
request_timeout = "30s"
stall_timeout = "10s"

[admin]
listen = "{admin}"

[geoip]
{database}trusted_proxies = ["127.0.0.1/32", "::1/128"]
default_region = "us-east"

[health]
interval = "1s"
timeout = "500ms"
unhealthy_after = 2
healthy_after = 2
slow_start = "3s"
"#
    );
    for ((name, loc, countries), endpoint) in REGIONS.iter().zip(endpoints) {
        let countries: Vec<String> = countries
            .iter()
            .filter(|c| geoip.is_empty() || **c != "US")
            .map(|c| format!("{c:?}"))
            .collect();
        s.push_str(&format!(
            "\n[[region]]\nname = \"{name}\"\nlocation = [{}, {}]\ncountries = [{}]\nendpoints = [\"{endpoint}\"]\n",
            loc[0],
            loc[1],
            countries.join(", ")
        ));
    }
    s.push_str("\n[[residency]]\nname = \"uk\"\ncountries = [\"GB\"]\nregions = [\"uk-south\"]\n");
    s
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

/// The extra tour lines when city databases split the US.
fn split_lines(p: SocketAddr, geoip: &[PathBuf]) -> String {
    if geoip.is_empty() {
        return String::new();
    }
    format!(
        r#"
  # City databases ({files}): the US is no region's home, so a US client goes to the
  # nearer coast by its own coordinates
  curl -si -H 'X-Forwarded-For: 13.56.0.1' http://{p}/v1/chat/completions -d '{{"model":"demo"}}' | grep x-meridian-region  # San Jose -> us-west
  curl -si -H 'X-Forwarded-For: 52.0.0.1' http://{p}/v1/chat/completions -d '{{"model":"demo"}}' | grep x-meridian-region   # Ashburn -> us-east
"#,
        files = geoip
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Runs the tour until Ctrl-C; `geoip` lists city databases to split the US with.
pub async fn run(listen: SocketAddr, admin: SocketAddr, geoip: &[PathBuf]) -> Result<(), Box<dyn std::error::Error>> {
    let mut upstreams = Vec::new();
    for (name, _, _) in REGIONS {
        upstreams.push(DemoUpstream::start(name).await?);
    }
    let endpoints: Vec<String> = upstreams.iter().map(DemoUpstream::url).collect();
    let text = config_text(listen, admin, &endpoints, geoip);
    // Written out so `meridian route -c` and `meridian check -c` can be tried on it.
    let config_path = std::env::temp_dir().join(format!("meridian-demo-{}.toml", std::process::id()));
    std::fs::write(&config_path, &text)?;
    let mut config = Config::parse(&text, Some(&config_path))?;
    config.admin.token = Some(TOKEN.to_string());
    let running = crate::app::start(config).await?;
    let p = running.listen;
    let a = running.admin;
    let tour = format!(
        r#"
Meridian demo: six fake inference regions on loopback, the proxy on http://{p}, admin on http://{a}
{regions}
Try these (X-Forwarded-For is believed because curl connects from 127.0.0.1, a trusted proxy):

  # GB client -> uk-south (residency zone "uk"), streamed token by token
  curl -N -H 'X-Forwarded-For: 81.2.69.142' http://{p}/v1/chat/completions \
       -H 'content-type: application/json' -d '{{"model":"demo","stream":true,"messages":[{{"role":"user","content":"hi"}}]}}'

  # US client -> us-east
  curl -si -H 'X-Forwarded-For: 8.8.8.8' http://{p}/v1/chat/completions -d '{{"model":"demo"}}'
{split}
  # IE client -> eu-west
  curl -si -H 'X-Forwarded-For: 87.44.0.1' http://{p}/v1/chat/completions -d '{{"model":"demo"}}'

  # AU client -> ap-southeast
  curl -si -H 'X-Forwarded-For: 1.1.1.1' http://{p}/v1/chat/completions -d '{{"model":"demo"}}'

  # Why? Explain the routing decision for an address
  cargo run --release -- route -c {cfg} 81.2.69.142 87.44.0.1 1.1.1.1{split_ips}
  curl -s http://{a}/status

Failover drill:

  # drain eu-west: IE clients move to the next-nearest region (uk-south), GB clients stay home
  # (for a timed drill: .../drain?for=2m&reason=drill, and it comes back by itself)
  curl -s -X POST -H 'Authorization: Bearer {token}' 'http://{a}/regions/eu-west/drain?reason=drill'
  curl -si -H 'X-Forwarded-For: 87.44.0.1' http://{p}/v1/chat/completions -d '{{}}' | grep x-meridian-region

  # drain uk-south: GB clients get 503 residency_unavailable, never served abroad
  curl -s -X POST -H 'Authorization: Bearer {token}' http://{a}/regions/uk-south/drain
  curl -s -H 'X-Forwarded-For: 81.2.69.142' http://{p}/v1/chat/completions -d '{{}}'

  # put them back
  curl -s -X POST -H 'Authorization: Bearer {token}' http://{a}/regions/eu-west/undrain
  curl -s -X POST -H 'Authorization: Bearer {token}' http://{a}/regions/uk-south/undrain

  # metrics
  curl -s http://{a}/metrics | grep meridian_requests_total

Press Ctrl-C to stop.
"#,
        regions = REGIONS
            .iter()
            .zip(&endpoints)
            .map(|((n, _, c), e)| {
                let homes: Vec<&str> = c.iter().copied().filter(|c| geoip.is_empty() || *c != "US").collect();
                format!("  {n:<13} {e:<24} home of {}", homes.join(", "))
            })
            .collect::<Vec<_>>()
            .join("\n"),
        token = TOKEN,
        cfg = config_path.display(),
        split = split_lines(p, geoip),
        split_ips = if geoip.is_empty() { "" } else { " 13.56.0.1 52.0.0.1" },
    );
    // The tour is for whoever reads it; a reader that went away (`| head`, a closed
    // terminal) is no reason to stop serving, and `println!` would panic on it.
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_all(tour.as_bytes()).and_then(|()| stdout.flush()) {
        tracing::warn!(error = %e, "the demo tour could not be printed; still serving");
    }
    drop(stdout);
    let _ = tokio::signal::ctrl_c().await;
    running.shutdown().await;
    let _ = std::fs::remove_file(&config_path);
    Ok(())
}
