//! The Kubernetes manifests as `kubectl kustomize` builds them, one overlay per deployment
//! pattern: the pod runs as a numeric non-root user, probes hit the admin port, the grace
//! period outlasts the configured shutdown, and the ConfigMap's config is one Meridian
//! accepts. Skipped, with a message, where kubectl is not installed.

use std::path::{Path, PathBuf};
use std::process::Command;

use meridian::config::Config;
use yaml_rust2::{Yaml, YamlLoader};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn overlays() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/kubernetes/overlays"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("kustomization.yaml").is_file())
        .collect();
    dirs.sort();
    dirs
}

/// The built objects, or `None` when kubectl is not there.
fn kustomize(dir: &Path) -> Option<Vec<Yaml>> {
    let out = match Command::new("kubectl").arg("kustomize").arg(dir).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("kubectl: {e}"),
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(YamlLoader::load_from_str(&String::from_utf8(out.stdout).unwrap()).unwrap())
}

fn find<'a>(objects: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    objects
        .iter()
        .find(|o| o["kind"].as_str() == Some(kind) && o["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The container port a probe names (by name or number).
fn probe_port(container: &Yaml, probe: &str) -> (String, i64) {
    let get = &container[probe]["httpGet"];
    let path = get["path"]
        .as_str()
        .unwrap_or_else(|| panic!("{probe} has an httpGet path"))
        .to_string();
    let port = match &get["port"] {
        Yaml::Integer(n) => *n,
        Yaml::String(name) => container["ports"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_i64())
            .unwrap_or_else(|| panic!("{probe}: no container port named {name}")),
        other => panic!("{probe}: port {other:?}"),
    };
    (path, port)
}

#[test]
fn every_overlay_builds_a_deployment_that_fits_its_config() {
    let dirs = overlays();
    let names: Vec<String> = dirs
        .iter()
        .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["active-passive", "fallback", "hub-and-spoke", "sharded"]);
    for dir in &dirs {
        let Some(objects) = kustomize(dir) else {
            eprintln!("kubectl not found: deploy/kubernetes not checked (install kubectl to run this test)");
            return;
        };
        let at = dir.display();
        let deployment = find(&objects, "Deployment", "meridian");
        let pod = &deployment["spec"]["template"]["spec"];
        let container = &pod["containers"][0];

        // Numeric non-root user at both levels, so `runAsNonRoot` can be checked.
        for (what, sc) in [
            ("pod", &pod["securityContext"]),
            ("container", &container["securityContext"]),
        ] {
            assert_eq!(sc["runAsUser"].as_i64(), Some(10001), "{at}: {what} runAsUser");
            assert_eq!(sc["runAsGroup"].as_i64(), Some(10001), "{at}: {what} runAsGroup");
            assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true), "{at}: {what} runAsNonRoot");
        }
        let sc = &container["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{at}");
        assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false), "{at}");
        assert_eq!(
            sc["capabilities"]["drop"]
                .as_vec()
                .map(|v| v.iter().filter_map(Yaml::as_str).collect::<Vec<_>>()),
            Some(vec!["ALL"]),
            "{at}"
        );
        assert!(
            container["resources"]["requests"]["cpu"].as_str().is_some(),
            "{at}: HPA needs a CPU request"
        );

        // The config the pods load, from the ConfigMap.
        let configmap = find(&objects, "ConfigMap", "meridian-config");
        let text = configmap["data"]["meridian.toml"]
            .as_str()
            .expect("meridian.toml in the ConfigMap");
        // Validated as the pods will load it, with their secrets in the environment.
        let secret = |_: &str| Some("set-by-the-secret".to_string());
        let config = Config::parse_with_env(text, None, &secret).unwrap_or_else(|e| panic!("{at}: {e}"));
        let admin_port = i64::from(config.admin.listen.port());
        assert!(
            config.admin.listen.ip().is_unspecified(),
            "{at}: admin must listen beyond loopback for probes and Prometheus"
        );
        assert_eq!(config.admin.token_env.as_deref(), Some("MERIDIAN_ADMIN_TOKEN"), "{at}");

        // Probes on the admin port, the right paths.
        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
            assert_eq!(
                probe_port(container, probe),
                (path.to_string(), admin_port),
                "{at}: {probe}"
            );
        }
        let http = container["ports"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|p| p["name"].as_str() == Some("http"))
            .and_then(|p| p["containerPort"].as_i64());
        assert_eq!(http, Some(i64::from(config.server.listen.port())), "{at}: proxy port");

        // The kubelet waits longer than Meridian's own shutdown: delay, then drain.
        let grace = pod["terminationGracePeriodSeconds"].as_i64().expect("grace period") as f64;
        let delay = config.server.shutdown_delay.as_secs_f64();
        let timeout = config.server.shutdown_timeout.as_secs_f64();
        assert!(delay > 0.0, "{at}: shutdown_delay set");
        assert!(grace > delay + timeout, "{at}: grace {grace}s <= {delay}s + {timeout}s");

        // The token and fallback key come from the Secret the base defines; it holds no
        // values in the repository.
        let secret = find(&objects, "Secret", "meridian-secrets");
        assert!(
            secret["data"].is_badvalue() && secret["stringData"].is_badvalue(),
            "{at}"
        );
        let refs: Vec<(&str, &str)> = container["env"]
            .as_vec()
            .unwrap()
            .iter()
            .filter_map(|e| {
                let r = &e["valueFrom"]["secretKeyRef"];
                Some((e["name"].as_str()?, r["name"].as_str()?))
            })
            .collect();
        assert_eq!(
            refs,
            [
                ("MERIDIAN_ADMIN_TOKEN", "meridian-secrets"),
                ("HOSTED_API_KEY", "meridian-secrets")
            ],
            "{at}"
        );

        // Metrics: ServiceMonitor (no schema offline, so checked here) -> admin Service -> pod.
        let admin_service = find(&objects, "Service", "meridian-admin");
        let monitor = find(&objects, "ServiceMonitor", "meridian");
        let selected = &monitor["spec"]["selector"]["matchLabels"];
        for (k, v) in selected.as_hash().unwrap() {
            assert_eq!(&admin_service["metadata"]["labels"][k.as_str().unwrap()], v, "{at}");
        }
        let endpoint = &monitor["spec"]["endpoints"][0];
        assert_eq!(endpoint["path"].as_str(), Some("/metrics"));
        assert_eq!(
            endpoint["port"].as_str(),
            admin_service["spec"]["ports"][0]["name"].as_str(),
            "{at}"
        );
        assert_eq!(admin_service["spec"]["ports"][0]["targetPort"].as_str(), Some("admin"));

        // Admin is reachable only from the monitoring namespace.
        let policy = find(&objects, "NetworkPolicy", "meridian");
        for rule in policy["spec"]["ingress"].as_vec().unwrap() {
            let ports: Vec<i64> = rule["ports"]
                .as_vec()
                .unwrap()
                .iter()
                .filter_map(|p| p["port"].as_i64())
                .collect();
            if ports.contains(&admin_port) {
                assert_eq!(ports, [admin_port], "{at}: admin shares no rule");
                let from = rule["from"].as_vec().expect("admin rule has a from");
                assert_eq!(from.len(), 1, "{at}");
                assert_eq!(
                    from[0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"].as_str(),
                    Some("monitoring"),
                    "{at}"
                );
            } else {
                assert!(rule["from"].is_badvalue(), "{at}: the proxy port is open to clients");
            }
        }
        let client_service = find(&objects, "Service", "meridian");
        assert_eq!(client_service["spec"]["externalTrafficPolicy"].as_str(), Some("Local"));

        // And Meridian accepts the config as the pod would load it.
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("meridian.toml");
        std::fs::write(&path, text).unwrap();
        let check = Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args(["check", "-c"])
            .arg(&path)
            .env("HOSTED_API_KEY", "Bearer test")
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{at}: {}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
}

#[test]
fn the_base_config_is_the_container_config() {
    let base = std::fs::read_to_string(root().join("deploy/kubernetes/base/meridian.toml")).unwrap();
    let container = std::fs::read_to_string(root().join("deploy/container/meridian.toml")).unwrap();
    assert!(
        base == container,
        "deploy/kubernetes/base/meridian.toml drifted from deploy/container/meridian.toml"
    );
}

/// Whether `.dockerignore`'s `patterns` leave `path` in the build context: the last pattern
/// that matches the path or one of its parent directories wins (Docker's rule). Patterns
/// are the forms the file uses: a path, `dir/`, or a `*` within one segment.
fn in_context(patterns: &[(bool, String)], path: &str) -> bool {
    fn glob(pattern: &str, name: &str) -> bool {
        match pattern.split_once('*') {
            None => pattern == name,
            Some((head, tail)) => {
                name.len() >= head.len() + tail.len() && name.starts_with(head) && name.ends_with(tail)
            }
        }
    }
    let segments: Vec<&str> = path.split('/').collect();
    let mut included = true;
    for (keep, pattern) in patterns {
        let parts: Vec<&str> = pattern.trim_end_matches('/').split('/').collect();
        let matches = parts.len() <= segments.len() && parts.iter().zip(&segments).all(|(p, s)| glob(p, s));
        if matches {
            included = *keep;
        }
    }
    included
}

#[test]
fn the_docker_build_context_holds_everything_the_build_reads() {
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    let patterns: Vec<(bool, String)> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| match l.strip_prefix('!') {
            Some(kept) => (true, kept.to_string()),
            None => (false, l.to_string()),
        })
        .collect();
    assert!(
        !in_context(&patterns, "tests/kubernetes.rs"),
        "the context is an allow-list"
    );
    assert!(!in_context(&patterns, "benches/load/compare.sh"));

    // What the build stage copies, every target the manifest declares (cargo refuses a
    // manifest whose target file is missing), and the profile-guided build's tools.
    let mut needed: Vec<String> = Vec::new();
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let words: Vec<&str> = line.split_whitespace().skip(1).collect();
        needed.extend(words[..words.len() - 1].iter().map(|w| w.to_string()));
    }
    let manifest: toml::Table = std::fs::read_to_string(root().join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    for bench in manifest["bench"].as_array().unwrap() {
        needed.push(format!("benches/{}.rs", bench["name"].as_str().unwrap()));
    }
    let script = std::fs::read_to_string(root().join("scripts/optimized-build.sh")).unwrap();
    for example in ["fast_upstream", "profile_load"] {
        assert!(script.contains(&format!("--example {example}")));
        needed.push(format!("examples/{example}.rs"));
    }
    needed.push("scripts/optimized-build.sh".into());
    for path in &needed {
        let full = root().join(path);
        assert!(full.exists(), "{path} does not exist");
        if full.is_dir() {
            // A copied directory needs some of its files in the context, not all (benches/
            // copies its sources, not the load scripts).
            let files = files_under(&full);
            assert!(
                files.iter().any(|f| in_context(&patterns, f)),
                ".dockerignore leaves all of {path}/ out of the build context"
            );
        } else {
            assert!(
                in_context(&patterns, path),
                ".dockerignore leaves {path} out of the build context"
            );
        }
    }
}

/// The files under `dir`, as paths relative to the repository root.
fn files_under(dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path.strip_prefix(root()).unwrap().to_string_lossy().into_owned());
        }
    }
    files
}
