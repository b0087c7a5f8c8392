//! The alert rules of `deploy/alerts.yml` pass their promtool unit tests
//! (`deploy/alerts.test.yml`: each alert firing on its situation and quiet on the
//! nearest other), and every metric they and the two Grafana dashboards read is one the
//! real broker and agent expose, so a renamed metric cannot silently turn an alert off
//! or blank a panel.
//!
//! promtool comes from Debian's `prometheus` package, which `.ci/run` installs; where it
//! is missing the promtool test prints `SKIPPED: promtool not installed` and passes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use lienthong_tests::*;

const A: &str = "000.00.00.H31";
const C: &str = "000.00.15.H31";

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn promtool() -> Option<PathBuf> {
    let found = Command::new("promtool").arg("--version").output().ok()?;
    found.status.success().then(|| PathBuf::from("promtool"))
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let Some(promtool) = promtool() else {
        println!("SKIPPED: promtool not installed");
        return;
    };
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts.test.yml"],
    ] {
        let output = Command::new(&promtool)
            .args(&args)
            .current_dir(deploy())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "promtool {}:\n{}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The metric names an alert expression mentions: words starting with one of our
/// prefixes (labels and functions never do).
fn metrics_in_rules(rules: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in rules.lines() {
        let Some(expr) = line.trim().strip_prefix("expr:") else {
            continue;
        };
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("lienthong_") || word.starts_with("process_") {
                names.insert(word.to_owned());
            }
        }
    }
    names
}

/// The metric names the queries of a Grafana dashboard mention.
fn metrics_in_dashboard(file: &str) -> BTreeSet<String> {
    fn walk(value: &serde_json::Value, out: &mut BTreeSet<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr" | "definition", serde_json::Value::String(expr)) => {
                            out.extend(metrics_in_rules(&format!("expr: {expr}")));
                        }
                        _ => walk(value, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let text = std::fs::read_to_string(deploy().join(file)).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = BTreeSet::new();
    walk(&json, &mut out);
    out
}

/// The metric names of a Prometheus text exposition.
fn exposed(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_alerts_and_dashboards_read_is_exposed_by_the_broker_or_an_agent() {
    let rules = std::fs::read_to_string(deploy().join("alerts.yml")).unwrap();
    let mut wanted = metrics_in_rules(&rules);
    assert!(
        wanted.len() >= 10,
        "the rules should read many metrics: {wanted:?}"
    );
    for dashboard in ["grafana-dashboard.json", "grafana-agent-dashboard.json"] {
        let read = metrics_in_dashboard(dashboard);
        assert!(read.len() >= 5, "{dashboard} reads {read:?}");
        wanted.extend(read);
    }

    let world = World::new();
    let (broker, admin) = Broker::start_with_admin(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    // C registers, then goes offline: its queue and offline state are exposed.
    let c = Agent::start(world.agent_config(C, &broker.url)).await;
    c.stop().await;
    a.send(&[C], "Giấy mời họp", &[("giay-moi.txt", b"hop luc 8h")])
        .await;

    let client = reqwest::Client::new();
    let broker_text = client
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let agent_text = client
        .get(format!("{}/metrics", a.api))
        .bearer_auth(&a.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut all = exposed(&broker_text);
    all.extend(exposed(&agent_text));
    let missing: Vec<&String> = wanted.iter().filter(|name| !all.contains(*name)).collect();
    assert!(
        missing.is_empty(),
        "alerts or dashboards read metrics nobody exposes: {missing:?}"
    );
    for text in [&broker_text, &agent_text] {
        assert!(text.contains("lienthong_build_info{"), "{text}");
        assert!(text.contains("process_cpu_seconds_total "), "{text}");
        assert!(
            text.contains("lienthong_certificate_not_after_timestamp_seconds{certificate=\"tls\"}"),
            "{text}"
        );
    }
    assert!(broker_text.contains("lienthong_broker_disk_reserve_bytes "));

    a.stop().await;
    broker.stop().await;
}
