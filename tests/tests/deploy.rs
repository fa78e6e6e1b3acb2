//! What ships beside the binary and cannot run here (no Docker engine): the Grafana dashboard,
//! the Dockerfile and docker-compose.yml. The dashboard's queries are checked against a real
//! scrape after traffic through every metric family; the container files are parsed and every
//! path, port, command and configuration they name is checked against the repository and the
//! policies.

// Test code: a panic is how a failed expectation is reported.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_possible_truncation)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use http::Request;
use weir_e2e::tls::{client_config, connect, Ca};
use weir_e2e::*;

/// Every `weir_*` series name in the dashboard's queries, with the labels each query groups by
/// or matches on.
fn dashboard_queries() -> BTreeMap<String, BTreeSet<String>> {
    let text = std::fs::read_to_string(repo_root().join("deploy/grafana/weir.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            // `agg by (labels) (inner)`: the labels apply to the metrics of `inner`.
            let mut scopes: Vec<(usize, usize, Vec<String>)> = Vec::new();
            let mut from = 0;
            while let Some(at) = expr[from..].find("by (") {
                let open = from + at + 3;
                let close = open + expr[open..].find(')').unwrap();
                let labels: Vec<String> = expr[open + 1..close]
                    .split(',')
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty() && l != "le")
                    .collect();
                let inner = close + expr[close..].find('(').unwrap();
                let mut depth = 0;
                let mut end = inner;
                for (i, ch) in expr[inner..].char_indices() {
                    match ch {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    if depth == 0 {
                        end = inner + i;
                        break;
                    }
                }
                scopes.push((inner, end, labels));
                from = close;
            }
            let bytes = expr.as_bytes();
            let mut i = 0;
            while let Some(at) = expr[i..].find("weir_") {
                let start = i + at;
                let end = start
                    + expr[start..]
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(expr.len() - start);
                let name = expr[start..end].to_string();
                let mut own: BTreeSet<String> = scopes
                    .iter()
                    .filter(|(a, b, _)| *a < start && start < *b)
                    .flat_map(|(_, _, l)| l.iter().cloned())
                    .collect();
                if bytes.get(end) == Some(&b'{') {
                    let close = expr[end..].find('}').unwrap() + end;
                    for m in expr[end + 1..close].split(',') {
                        own.insert(m.split(['=', '!', '~']).next().unwrap().trim().to_string());
                    }
                }
                out.entry(name).or_default().extend(own);
                i = end;
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_queries_select_series_that_exist() {
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "{queries:?}");
    let origin = Origin::start(|_req| async {
        let mut r = text(200, "ok");
        r.headers_mut().insert("cache-control", "max-age=60".parse().unwrap());
        r
    })
    .await;
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("dashboard test CA");
    let (cert, key) = ca.server(&["localhost"]).write(dir.path(), "server");
    let catalog = repo_root().join("plugins/catalog.wasm");
    assert!(catalog.is_file(), "run `make plugins` first");
    let yaml = format!(
        "listen:\n  - addr: 127.0.0.1:0\n  - addr: 127.0.0.1:0\n    tls:\n      certs:\n        - {{ cert: {}, key: {} }}\nadmin:\n  addr: 127.0.0.1:0\nredis:\n  url: {}\n  breaker: {{ failures: 1, open_for: 30s }}\nconsumers:\n  - id: alice\n    keys_sha256: [\"{}\"]\nbudgets:\n  api: {{ limit: \"1\", per: 1d, fail: open }}\nroutes:\n  - name: cached\n    match: {{ path: /c/ }}\n    upstream: {u}\n    cache: {{ stale_if_error: 1m }}\n    invalidate: {{ tags: [t] }}\n  - name: limited\n    match: {{ path: /limited }}\n    upstream: {u}\n    rate_limit: {{ key: route, rate: 1/1h, burst: 1, fail: local }}\n  - name: paid\n    match: {{ path: /paid }}\n    upstream: {u}\n    consumer: {{ from: header:x-api-key, required: true }}\n    budget: {{ name: api, cost: \"1\" }}\n  - name: plugged\n    match: {{ path: /products }}\n    upstream: {u}\n    plugin: {{ path: {} }}\n    cache: {{}}\n",
        cert.display(),
        key.display(),
        redis.url(),
        sha256_hex("alice-key"),
        catalog.display(),
        u = origin.url()
    );
    let gw = Gateway::start(&yaml);
    let c = client();
    let call = |path: &str, key: Option<&str>| {
        let mut b = Request::get(gw.url(path));
        if let Some(k) = key {
            b = b.header("x-api-key", k);
        }
        b.body(full("")).unwrap()
    };
    // Cache: miss, L1 hit, a write's invalidation; limits: one admitted, one refused; the
    // budget: one charged, one refused; the plugin route; TLS: a good handshake and plain
    // HTTP on the TLS port; a reload; the Redis tier going away (a limit falls back).
    for p in ["/c/1", "/c/1", "/products/1"] {
        send(&c, call(p, None)).await;
    }
    send(&c, Request::post(gw.url("/c/1")).body(full("x")).unwrap()).await;
    for _ in 0..2 {
        send(&c, call("/limited", None)).await;
        send(&c, call("/paid", Some("alice-key"))).await;
    }
    let tls_addr = gw.listen[1];
    let mut conn = connect(tls_addr, "localhost", &client_config(ca.roots(), &["http/1.1"], None)).await.unwrap();
    assert_eq!(conn.get("localhost", "/c/2", &[]).await.unwrap().status, 200);
    raw(tls_addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Duration::from_secs(2)).await;
    let reload = gw.reload().await;
    assert_eq!(reload.status, 200);
    redis.kill();
    for _ in 0..3 {
        send(&c, call("/limited", None)).await;
    }

    let scrape = get(&gw.admin_url("/metrics")).await.text();
    // name -> labels seen on its series (histograms by their `_bucket` series).
    let mut series: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in scrape.lines().filter(|l| l.starts_with("weir_")) {
        let name_end = line.find(['{', ' ']).unwrap();
        let labels = series.entry(line[..name_end].to_string()).or_default();
        if line.as_bytes()[name_end] == b'{' {
            let close = line.find('}').unwrap();
            for pair in line[name_end + 1..close].split(',') {
                labels.insert(pair.split('=').next().unwrap().to_string());
            }
        }
    }
    for (name, labels) in &queries {
        let seen =
            series.get(name).unwrap_or_else(|| panic!("the dashboard queries `{name}`, not in the scrape:\n{scrape}"));
        for l in labels {
            assert!(seen.contains(l), "the dashboard selects `{name}` by `{l}`; its series have {seen:?}");
        }
        if name.ends_with("_bucket") {
            assert!(seen.contains("le"), "{name} has no buckets");
        }
    }
}

fn yaml_file(path: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Dockerfile instructions, continuation lines joined.
fn dockerfile() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        if let Some(rest) = t.strip_suffix('\\') {
            cur.push_str(rest);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let (op, args) = cur.split_once(' ').unwrap_or((&cur, ""));
        out.push((op.to_ascii_uppercase(), args.trim().to_string()));
        cur.clear();
    }
    out
}

#[test]
fn compose_and_dockerfile_agree_with_the_policies() {
    let root = repo_root();
    let docker = dockerfile();
    let ops: Vec<&str> = docker.iter().map(|(o, _)| o.as_str()).collect();
    assert_eq!(ops.iter().filter(|o| **o == "FROM").count(), 2, "multi-stage: a build and a runtime stage");
    // Runtime stage: not root, a HEALTHCHECK through `weir health` on the policy's admin port.
    let runtime_from = docker.iter().rposition(|(o, _)| o == "FROM").unwrap();
    let runtime = &docker[runtime_from..];
    let user = runtime.iter().find(|(o, _)| o == "USER").map(|(_, a)| a.clone()).expect("a USER");
    assert!(user != "root" && user != "0", "{user}");
    let health = runtime.iter().find(|(o, _)| o == "HEALTHCHECK").map(|(_, a)| a.clone()).expect("a HEALTHCHECK");
    assert!(health.contains("\"weir\", \"health\""), "{health}");
    // Every COPY from the context names a file or directory of the repository; what the
    // runtime stage copies from the build stage is what the build stage makes.
    let build_run: String =
        docker[..runtime_from].iter().filter(|(o, _)| o == "RUN").map(|(_, a)| a.as_str()).collect();
    let mut installed = Vec::new();
    for (op, args) in runtime.iter().filter(|(o, _)| o == "COPY") {
        let words: Vec<&str> = args.split_whitespace().collect();
        let (from_build, srcs) = match words[0].strip_prefix("--from=") {
            Some(_) => (true, &words[1..words.len() - 1]),
            None => (false, &words[..words.len() - 1]),
        };
        for src in srcs {
            if from_build {
                let file = src.rsplit('/').next().unwrap();
                // The build directory is a cache mount: binaries are copied out to /out.
                let made = (src.starts_with("/out/bin/")
                    && build_run.contains("cargo build --release")
                    && build_run.contains(&format!("target/release/{file}")))
                    || (src.starts_with("/out/plugins/")
                        && file.ends_with(".wasm")
                        && build_run.contains("plugin build"));
                assert!(made, "{op} {src}: the build stage does not make it");
                installed.push(file.to_string());
            } else {
                assert!(root.join(src).exists(), "COPY {src}: not in the repository");
            }
        }
    }
    for wasm in installed.iter().filter(|f| f.ends_with(".wasm")) {
        assert!(root.join("plugins").join(wasm.trim_end_matches(".wasm")).join("Cargo.toml").is_file(), "{wasm}");
    }

    // The policy the image runs, validated as the compose services run it.
    let compose = yaml_file("docker-compose.yml");
    let services = compose["services"].as_object().unwrap();
    let policy_in_image = "/etc/weir/policies/compose.yaml";
    let policy = root.join("policies/compose.yaml");
    let (ok, out) = {
        let o = std::process::Command::new(weir_bin()).args(["validate", "--config"]).arg(&policy).output().unwrap();
        (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
    };
    assert!(ok, "{out}");
    let p: serde_json::Value = serde_norway::from_str(&std::fs::read_to_string(&policy).unwrap()).unwrap();
    let port_of = |addr: &str| addr.rsplit(':').next().unwrap().to_string();
    let listen_port = port_of(p["listen"][0]["addr"].as_str().unwrap());
    let admin_port = port_of(p["admin"]["addr"].as_str().unwrap());
    assert!(health.contains(&format!(":{admin_port}")), "the HEALTHCHECK asks the policy's admin port: {health}");
    let exposed: Vec<String> = runtime
        .iter()
        .filter(|(o, _)| o == "EXPOSE")
        .flat_map(|(_, a)| a.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect();
    assert!(exposed.contains(&listen_port) && exposed.contains(&admin_port), "{exposed:?}");

    // Every host the policy names is a compose service, on the port that service serves.
    let weirs: Vec<&str> = services
        .iter()
        .filter(|(_, s)| s["command"].as_array().is_some_and(|c| c.iter().any(|a| a == policy_in_image)))
        .map(|(n, _)| n.as_str())
        .collect();
    assert!(weirs.len() >= 2, "two Weir instances share Redis: {weirs:?}");
    assert_eq!(p["redis"]["instances"].as_u64(), Some(weirs.len() as u64), "redis.instances counts them");
    // The admin API answers only to names it lists: every name Prometheus scrapes by is there.
    let admin_hosts: Vec<&str> =
        p["admin"]["hosts"].as_array().map_or(Vec::new(), |a| a.iter().filter_map(|h| h.as_str()).collect());
    let prometheus = std::fs::read_to_string(root.join("deploy/prometheus/prometheus.yml")).unwrap();
    for w in &weirs {
        assert!(prometheus.contains(&format!("\"{w}:{admin_port}\"")), "Prometheus scrapes {w}");
        assert!(
            admin_hosts.contains(w),
            "`{w}` is in admin.hosts, or its admin API refuses the scrape: {admin_hosts:?}"
        );
    }
    let redis_host = p["redis"]["url"].as_str().unwrap().trim_start_matches("redis://").split(':').next().unwrap();
    assert!(services.contains_key(redis_host), "redis host `{redis_host}`");
    for r in p["routes"].as_array().unwrap() {
        let up = r["upstream"].as_str().unwrap().trim_start_matches("http://");
        let (host, port) = up.split_once(':').unwrap();
        let svc = &services[host];
        let entry = svc["entrypoint"].to_string();
        assert!(entry.contains(&format!("0.0.0.0:{port}")), "{host} serves {port}: {entry}");
        let bin = svc["entrypoint"][0].as_str().unwrap();
        assert!(installed.iter().any(|f| f == bin), "{bin} is not in the image");
    }
    // One published port in front of both, through the load balancer's config.
    let lb = &services["lb"];
    let volume = lb["volumes"][0].as_str().unwrap();
    let conf = std::fs::read_to_string(root.join(volume.split(':').next().unwrap())).unwrap();
    for w in &weirs {
        assert!(conf.contains(&format!("server {w}:{listen_port}")), "the balancer sends to {w}:{listen_port}\n{conf}");
    }
    let published = lb["ports"][0].as_str().unwrap();
    let inner = published.rsplit(':').next().unwrap();
    assert!(conf.contains(&format!("listen {inner};")), "{published} vs\n{conf}");
    // Every host path a service mounts exists.
    for (name, s) in services {
        for v in s["volumes"].as_array().map_or(&[][..], Vec::as_slice) {
            let host = v.as_str().unwrap().split(':').next().unwrap();
            assert!(root.join(host).exists(), "{name} mounts {host}: not in the repository");
        }
        if s["build"].is_string() {
            assert!(root.join(s["build"].as_str().unwrap()).join("Dockerfile").is_file());
        }
    }
    // Monitoring: Prometheus scrapes each instance's admin port with the compose token;
    // Grafana loads the dashboard file from the provisioned path.
    for svc in ["prometheus", "grafana"] {
        assert_eq!(services[svc]["profiles"], serde_json::json!(["monitoring"]));
    }
    let prom = yaml_file("deploy/prometheus/prometheus.yml");
    let targets = prom["scrape_configs"][0]["static_configs"][0]["targets"].to_string();
    for w in &weirs {
        assert!(targets.contains(&format!("{w}:{admin_port}")), "{targets}");
    }
    // The token: one secret file, read by Weir (`admin.token_file`) and Prometheus
    // (`credentials_file`) at the path compose mounts it; an example committed, the real one
    // ignored by git and by the image build.
    let secret_path = "/run/secrets/admin_token";
    assert_eq!(p["admin"]["token_file"].as_str(), Some(secret_path));
    assert_eq!(prom["scrape_configs"][0]["authorization"]["credentials_file"].as_str(), Some(secret_path));
    for svc in weirs.iter().copied().chain(["prometheus"]) {
        assert_eq!(services[svc]["secrets"], serde_json::json!(["admin_token"]), "{svc} gets the token file");
    }
    let secret_file = compose["secrets"]["admin_token"]["file"].as_str().unwrap().trim_start_matches("./");
    assert!(root.join(format!("{secret_file}.example")).is_file(), "an example of {secret_file}");
    let gitignore = std::fs::read_to_string(root.join(".gitignore")).unwrap();
    assert!(gitignore.lines().any(|l| l.trim_start_matches('/') == secret_file), "{secret_file} is not ignored by git");
    let dockerignore = std::fs::read_to_string(root.join(".dockerignore")).expect("a .dockerignore");
    for must in ["target", ".git", secret_file] {
        assert!(dockerignore.lines().any(|l| l.trim() == must), ".dockerignore leaves `{must}` in the context");
    }
    let example = std::fs::read_to_string(root.join(format!("{secret_file}.example"))).unwrap();
    for file in ["docker-compose.yml", "deploy/prometheus/prometheus.yml", "policies/compose.yaml"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        assert!(!text.contains(example.trim()), "{file} holds the token itself");
    }

    // Rules for the container files (hadolint-style, checked here since no engine runs):
    // 1. A service of Weir's image that runs something else has its own healthcheck (the
    //    image's asks Weir's admin API).
    for (name, s) in services {
        let weir_image = s["build"].is_string();
        let runs_weir = s["entrypoint"].is_null();
        if weir_image && !runs_weir {
            let test = s["healthcheck"]["test"].to_string();
            assert!(
                s["healthcheck"]["disable"] == true || !test.contains("/readyz") && test.contains("CMD"),
                "{name} inherits Weir's HEALTHCHECK: {test}"
            );
        }
        // 2. Nothing but the data plane's balancer is published beyond this machine.
        for port in s["ports"].as_array().map_or(&[][..], Vec::as_slice) {
            let port = port.as_str().unwrap();
            assert!(name == "lb" || port.starts_with("127.0.0.1:"), "{name} publishes {port} on every interface");
        }
    }
    // 3. The build keeps its dependencies between builds.
    assert!(build_run.contains("--mount=type=cache,target=/src/target"), "no build cache: {build_run}");
    // 4. The balancer sends X-Forwarded-For from a fixed address, the only one the policy trusts.
    let lb_ip = lb["networks"]["default"]["ipv4_address"].as_str().expect("a fixed balancer address");
    let subnet = compose["networks"]["default"]["ipam"]["config"][0]["subnet"].as_str().unwrap();
    let prefix = subnet.rsplit_once('.').unwrap().0;
    assert!(lb_ip.starts_with(&format!("{prefix}.")), "{lb_ip} is outside {subnet}");
    assert_eq!(p["server"]["trusted_proxies"], serde_json::json!([format!("{lb_ip}/32")]));
    assert!(conf.contains("proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"), "{conf}");
    let provider = yaml_file("deploy/grafana/provisioning/dashboards/weir.yaml");
    let dash_dir = provider["providers"][0]["options"]["path"].as_str().unwrap();
    let mounts = services["grafana"]["volumes"].to_string();
    assert!(mounts.contains(&format!("./deploy/grafana/weir.json:{dash_dir}/weir.json")), "{mounts}");
    let ds = yaml_file("deploy/grafana/provisioning/datasources/prometheus.yaml");
    assert_eq!(ds["datasources"][0]["url"].as_str(), Some("http://prometheus:9090"));
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("deploy/grafana/weir.json")).unwrap()).unwrap();
    let uid = ds["datasources"][0]["uid"].as_str().unwrap();
    for panel in dash["panels"].as_array().unwrap() {
        assert_eq!(panel["datasource"]["uid"].as_str(), Some(uid), "{}", panel["title"]);
    }
}
