//! The Prometheus endpoint of real daemons (`metrics_address`), scraped with curl: values agree
//! with `status --json`, counters move with real writes through NBD, and clients that are
//! wrong, silent or early (a scrape during `down`) get clear answers or a closed connection,
//! never a hang.

mod common;

use common::{text, Cluster, Options};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// A sample of a scrape: `name{labels} value`, with every pair of `labels` among the series'.
fn sample(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
        let wanted = labels.iter().all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\"")));
        (series_name == name && wanted).then(|| value.parse().expect("a numeric sample"))
    })
}

/// The sample, which must be there.
fn must(scrape: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(scrape, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in the scrape:\n{scrape}"))
}

fn scrape(c: &Cluster, node: &str) -> String {
    let out = c.curl_metrics(node, "/metrics", &["--fail", "--include"]);
    assert!(out.status.success(), "scrape of {node} failed: {}", text(&out.stderr));
    let all = text(&out.stdout);
    let (head, body) = all.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    body.to_owned()
}

/// A fresh pair declared in sync without copying (no initial resync), alpha Primary.
fn fresh_pair(extra: &'static str) -> Cluster {
    let c = Cluster::new(&["alpha", "beta"], Options { disk_mib: 32, metrics: true, extra, ..Options::default() });
    c.create_md_and_up();
    c.wait_connected("alpha", &["beta"]);
    c.ok("alpha", &["new-current-uuid", "--clear-bitmap", "r0"]);
    c.wait_for("beta", "UpToDate", |s| s["disk"] == "UpToDate");
    c.ok("alpha", &["primary", "r0"]);
    c.wait_peer("alpha", "beta", "Established", "UpToDate");
    c
}

fn peer_u64(status: &Value, peer: &str, key: &str) -> u64 {
    Cluster::peer(status, peer)[key].as_u64().unwrap()
}

#[test]
fn a_scrape_agrees_with_status_and_counts_the_writes() {
    // The resync below must last long enough to be seen: 16 MiB at 2 MiB/s. Its bits clear
    // per epoch of 8 MiB, so its progress (and with it an ETA) shows after about 4 s.
    let c = fresh_pair("resync_rate_max_kib = 2048");
    let before = scrape(&c, "alpha");
    let status = c.status("alpha");
    assert_eq!(must(&before, "blkrepl_role", &[("resource", "r0"), ("role", "Primary")]), 1.0);
    assert_eq!(must(&before, "blkrepl_role", &[("role", "Secondary")]), 0.0);
    assert_eq!(must(&before, "blkrepl_disk_state", &[("state", "UpToDate")]), 1.0);
    assert_eq!(must(&before, "blkrepl_quorum", &[]), 1.0);
    assert_eq!(must(&before, "blkrepl_quorum_votes", &[]), status["quorum_votes"].as_f64().unwrap());
    assert_eq!(must(&before, "blkrepl_quorum_votes_needed", &[]), status["quorum_needed"].as_f64().unwrap());
    assert_eq!(must(&before, "blkrepl_peer_connection_state", &[("peer", "beta"), ("state", "Connected")]), 1.0);
    assert_eq!(must(&before, "blkrepl_peer_replication_state", &[("peer", "beta"), ("state", "Established")]), 1.0);
    assert_eq!(must(&before, "blkrepl_peer_out_of_sync_bytes", &[("peer", "beta")]), 0.0);
    assert_eq!(must(&before, "blkrepl_suspended_writes", &[]), 0.0);
    assert_eq!(must(&before, "blkrepl_writes_in_flight", &[]), 0.0);
    assert_eq!(sample(&before, "blkrepl_peer_resync_rate_bytes_per_second", &[("peer", "beta")]), None, "no resync runs");

    // Eight writes of 64 KiB, each in a 4 MiB extent of its own (cold: one activity-log
    // transaction each at least), and a flush.
    let writes: Vec<(u64, u64, u8)> = (0..8).map(|i| (i * 4 * MIB, 64 * 1024, 0x40 + i as u8)).collect();
    let sent_status_before = peer_u64(&c.status("alpha"), "beta", "sent_bytes");
    c.write("alpha", &writes);
    let status_before_scrape = c.status("alpha");
    let after = scrape(&c, "alpha");
    let status_after_scrape = c.status("alpha");
    let count = |s: &str, name: &str| must(s, name, &[("resource", "r0")]);
    assert!(
        count(&after, "blkrepl_write_latency_seconds_count") >= count(&before, "blkrepl_write_latency_seconds_count") + 8.0,
        "eight writes issued:\n{after}"
    );
    assert!(count(&after, "blkrepl_flush_latency_seconds_count") > count(&before, "blkrepl_flush_latency_seconds_count"));
    assert_eq!(
        must(&after, "blkrepl_write_latency_seconds_bucket", &[("le", "+Inf")]),
        count(&after, "blkrepl_write_latency_seconds_count")
    );
    let buckets: Vec<f64> = after
        .lines()
        .filter(|l| l.starts_with("blkrepl_write_latency_seconds_bucket{"))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap())
        .collect();
    assert_eq!(buckets.len(), 18, "{after}");
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "buckets are cumulative: {buckets:?}");
    assert!(count(&after, "blkrepl_write_latency_seconds_sum") > 0.0);
    assert!(count(&after, "blkrepl_activity_log_transactions_total") >= count(&before, "blkrepl_activity_log_transactions_total") + 1.0);
    assert_eq!(must(&after, "blkrepl_writes_in_flight", &[]), 0.0, "every write was answered");
    // Sent bytes grow (pings too, so the scrape lies between the two statuses around it).
    let sent = must(&after, "blkrepl_peer_sent_bytes_total", &[("peer", "beta")]) as u64;
    assert!(sent >= sent_status_before + 8 * 64 * 1024, "sent {sent}, before the writes {sent_status_before}");
    assert!(
        (peer_u64(&status_before_scrape, "beta", "sent_bytes")..=peer_u64(&status_after_scrape, "beta", "sent_bytes")).contains(&sent),
        "the scrape's sent bytes {sent} lie between the statuses around it"
    );
    let received = must(&after, "blkrepl_peer_received_bytes_total", &[("peer", "beta")]) as u64;
    assert!(
        (peer_u64(&status_before_scrape, "beta", "received_bytes")..=peer_u64(&status_after_scrape, "beta", "received_bytes")).contains(&received)
    );
    let beta = scrape(&c, "beta");
    assert_eq!(must(&beta, "blkrepl_role", &[("role", "Secondary")]), 1.0);
    assert!(must(&beta, "blkrepl_peer_received_bytes_total", &[("peer", "alpha")]) as u64 >= 8 * 64 * 1024);

    // Out of sync: beta disconnected, 16 MiB written on alpha.
    c.ok("beta", &["disconnect", "r0"]);
    c.wait_for("alpha", "beta gone", |s| Cluster::peer(s, "beta")["connection"] != "Connected");
    c.write("alpha", &[(0, 16 * MIB, 0x77)]);
    let status = c.status("alpha");
    let out_of_sync = peer_u64(&status, "beta", "out_of_sync_bytes");
    assert!(out_of_sync >= 16 * MIB, "{status:#}");
    let disconnected = scrape(&c, "alpha");
    assert_eq!(must(&disconnected, "blkrepl_peer_out_of_sync_bytes", &[("peer", "beta")]) as u64, out_of_sync);
    assert_eq!(must(&disconnected, "blkrepl_peer_connection_state", &[("peer", "beta"), ("state", "Connected")]), 0.0);
    let shown = Cluster::peer(&status, "beta")["connection"].as_str().unwrap().to_owned();
    assert_eq!(must(&disconnected, "blkrepl_peer_connection_state", &[("peer", "beta"), ("state", &shown)]), 1.0);

    // The resync back: rate, progress and state while it runs.
    c.ok("beta", &["connect", "r0"]);
    c.wait_for("alpha", "a resync to beta", |s| Cluster::peer(s, "beta")["resync"].is_object());
    // The ETA is there once the resync has moved enough to estimate it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let resyncing = loop {
        let resyncing = scrape(&c, "alpha");
        if sample(&resyncing, "blkrepl_peer_resync_eta_seconds", &[("peer", "beta")]).is_some() {
            break resyncing;
        }
        assert!(Instant::now() < deadline, "no resync ETA within 30 s:\n{resyncing}\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(200));
    };
    let eta = must(&resyncing, "blkrepl_peer_resync_eta_seconds", &[("peer", "beta")]);
    assert!(eta > 0.0 && eta < 600.0, "16 MiB at 2 MiB/s: {eta} s");
    assert_eq!(must(&resyncing, "blkrepl_peer_replication_state", &[("peer", "beta"), ("state", "SyncSource")]), 1.0, "{resyncing}");
    let done = must(&resyncing, "blkrepl_peer_resync_done_ratio", &[("peer", "beta")]);
    assert!(done > 0.0 && done < 1.0, "an ETA follows progress: {done}");
    assert!(must(&resyncing, "blkrepl_peer_resync_rate_bytes_per_second", &[("peer", "beta")]) > 0.0);
    assert!(must(&resyncing, "blkrepl_peer_out_of_sync_bytes", &[("peer", "beta")]) > 0.0);

    // Every metric the Grafana dashboard queries is one a daemon serves.
    let dashboard = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/grafana/blkrepl-dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let served = |name: &str| [&after, &resyncing].iter().any(|s| s.lines().any(|l| l.starts_with(&format!("{name}{{"))));
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for name in metric_names(expr) {
                assert!(served(&name), "panel {} queries {name}, which no scrape has", panel["title"]);
                queried += 1;
            }
        }
    }
    assert!(queried >= 15, "{queried} metric references in the dashboard");
}

/// The `blkrepl_...` names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("blkrepl_") {
        let name: String = rest[start..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        rest = &rest[start + name.len()..];
        names.push(name);
    }
    names
}

/// Sends `request` raw and returns all that comes back before the server closes.
fn raw(address: &str, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    stream.write_all(request).unwrap();
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    text(&reply)
}

#[test]
fn wrong_silent_and_late_clients_get_clear_answers() {
    let c = Cluster::new(&["alpha", "beta"], Options { disk_mib: 16, metrics: true, ..Options::default() });
    c.ok("alpha", &["create-md", "r0"]);
    c.ok("alpha", &["up", "r0"]);
    let address = c.metrics_addresses[0].clone();
    // A client that connects and sends nothing holds no scrape up.
    let mut silent = TcpStream::connect(&address).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let started = Instant::now();
    assert_eq!(must(&scrape(&c, "alpha"), "blkrepl_role", &[("role", "Secondary")]), 1.0);

    let not_found = c.curl_metrics("alpha", "/", &["--include"]);
    assert!(text(&not_found.stdout).starts_with("HTTP/1.1 404"), "{}", text(&not_found.stdout));
    let post = c.curl_metrics("alpha", "/metrics", &["--include", "-X", "POST"]);
    let post = text(&post.stdout);
    assert!(post.starts_with("HTTP/1.1 405") && post.contains("Allow: GET"), "{post}");
    let garbage = raw(&address, b"\x16\x03\x01 hello there\r\n\r\n");
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
    let endless = raw(&address, &[b"GET /metrics HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 16 * 1024]].concat());
    assert!(endless.starts_with("HTTP/1.1 431"), "{endless}");

    // The silent client is answered and closed once its time is up, not held forever.
    let mut reply = Vec::new();
    silent.read_to_end(&mut reply).expect("closed by the server, not by our read timeout");
    assert!(text(&reply).starts_with("HTTP/1.1 408"), "{}", text(&reply));
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
    assert_eq!(must(&scrape(&c, "alpha"), "blkrepl_role", &[("role", "Secondary")]), 1.0);

    // Scrapes while the daemon goes down: each is answered or refused, none hangs.
    let scraper = {
        let address = address.clone();
        std::thread::spawn(move || {
            let mut outcomes = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                let out = std::process::Command::new("curl")
                    .args(["--silent", "--max-time", "10", "--output", "/dev/null", "--write-out", "%{http_code}"])
                    .arg(format!("http://{address}/metrics"))
                    .output()
                    .unwrap();
                let code = out.status.code().unwrap_or(-1);
                outcomes.push((code, text(&out.stdout)));
                if code == 7 {
                    break; // refused: the daemon is gone
                }
            }
            outcomes
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    c.ok("alpha", &["down", "r0"]);
    let outcomes = scraper.join().unwrap();
    assert_eq!(outcomes.last().map(|(code, _)| *code), Some(7), "scrapes end refused once the daemon is gone: {outcomes:?}");
    for (code, http) in &outcomes {
        // 0: answered (200); 52, 56: the connection closed without an answer.
        assert!(matches!((code, http.as_str()), (0, "200") | (7 | 52 | 56, _)), "{outcomes:?}");
    }
    assert!(outcomes.iter().any(|(code, _)| *code == 0), "some scrape before `down` was answered: {outcomes:?}");
    let log = std::fs::read_to_string(c.run_dir().join("r0.alpha.log")).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn a_bad_metrics_address_is_a_config_error_and_a_taken_port_fails_up() {
    let c = Cluster::new(&["alpha", "beta"], Options { disk_mib: 16, metrics: true, ..Options::default() });
    c.ok("alpha", &["create-md", "r0"]);
    let good = format!("metrics_address = \"{}\"", c.metrics_addresses[0]);
    c.edit_config(&good, "metrics_address = \"localhost:9942\"");
    let out = c.cli("alpha", &["up", "r0"]);
    assert_eq!(out.status.code(), Some(10), "a configuration error: {}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("`node[0].metrics_address`") && err.contains("localhost:9942"), "{err}");

    c.edit_config("metrics_address = \"localhost:9942\"", &good);
    let taken = std::net::TcpListener::bind(&c.metrics_addresses[0]).unwrap();
    let out = c.cli("alpha", &["up", "r0"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("cannot listen for metrics scrapes") && err.contains(&c.metrics_addresses[0]), "{err}");
    drop(taken);
    c.ok("alpha", &["up", "r0"]);
    assert_eq!(must(&scrape(&c, "alpha"), "blkrepl_role", &[("role", "Secondary")]), 1.0);
}
