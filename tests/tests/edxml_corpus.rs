//! The producers' corpus end to end (issue 16): every package of `tests/edxml-corpus/`
//! (modelled on what provincial platforms, gateways and the vendors' SDKs send, see
//! docs/edxml.md) gets the outcome `expected.json` gives it through `POST /v1/edxml`,
//! through the drop folder, and through `lienthong edxml check`: accepted with its
//! business id, steering type and the list of fields not carried, or refused with the
//! exact message. Accepted documents are delivered and their status messages (sent by
//! the recipient in the vendors' forms) reach the sender. A package the parser accepts
//! but the agent refuses (`agent_error`) is accepted by `edxml check` and refused with
//! that message by the API and the drop folder.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use lienthong_agent::api_types::StatusView;
use lienthong_edxml::{Limits, parse_document};
use lienthong_tests::*;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_lienthong-under-test");

/// The document every status message of the corpus answers.
const ANSWERED: &str = "lgsp-vdxp-steering-zero.edxml";

struct Case {
    name: String,
    path: PathBuf,
    want: Value,
}

impl Case {
    fn accepted(&self) -> bool {
        self.want["outcome"] == "accepted"
    }

    fn is_status(&self) -> bool {
        self.want["kind"] == "status"
    }

    fn error(&self) -> &str {
        self.want["error"].as_str().unwrap()
    }

    /// A package the parser accepts but the agent refuses (e.g. status 01, which the
    /// agent reports by itself on arrival): the exact message.
    fn agent_error(&self) -> Option<&str> {
        self.want["agent_error"].as_str()
    }

    fn not_carried(&self) -> Vec<String> {
        sorted_strings(&self.want["not_carried"])
    }
}

fn sorted_strings(value: &Value) -> Vec<String> {
    let mut out: Vec<String> = value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    out.sort();
    out
}

/// The paths of a `not_carried` list as the agent and the CLI give it.
fn note_paths(value: &Value) -> Vec<String> {
    let mut out: Vec<String> = value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .map(|n| {
            assert!(n["reason"].as_str().is_some_and(|r| !r.is_empty()), "{n}");
            n["path"].as_str().unwrap().to_owned()
        })
        .collect();
    out.sort();
    out
}

fn corpus() -> Vec<Case> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("edxml-corpus");
    let expected: Value =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    let mut cases: Vec<Case> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".edxml"))
        .map(|name| Case {
            want: expected
                .get(&name)
                .unwrap_or_else(|| panic!("{name} has no outcome in expected.json"))
                .clone(),
            path: dir.join(&name),
            name,
        })
        .collect();
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(cases.len() >= 10, "{} packages", cases.len());
    assert_eq!(cases.len(), expected.as_object().unwrap().len());
    cases
}

/// Documents and refused packages (sent by A), then the accepted status messages (sent
/// by B, in file order: their codes only go forward in that order).
fn split(cases: &[Case]) -> (Vec<&Case>, Vec<&Case>) {
    cases.iter().partition(|c| !(c.accepted() && c.is_status()))
}

fn delivered(view: &StatusView) -> bool {
    !view.recipients.is_empty() && view.recipients.iter().all(|r| r.state == "delivered")
}

/// Checks an accepted document's answer (`POST /v1/edxml` or `sent/NAME.json`).
fn check_document_answer(case: &Case, answer: &Value) -> String {
    let name = &case.name;
    assert_eq!(answer["business_id"], case.want["business_id"], "{name}");
    assert_eq!(
        answer["edxml"]["steering_type"], case.want["steering_type"],
        "{name}"
    );
    assert_eq!(
        answer["edxml"]["steering_type_text"], case.want["steering_type_text"],
        "{name}"
    );
    assert_eq!(
        note_paths(&answer["edxml"]["not_carried"]),
        case.not_carried(),
        "{name}"
    );
    answer["message_id"].as_str().unwrap().to_owned()
}

fn check_status_answer(case: &Case, answer: &Value) {
    let name = &case.name;
    assert!(answer["message_id"].as_str().is_some(), "{name}: {answer}");
    assert!(answer["edxml"].get("steering_type").is_none(), "{name}");
    assert_eq!(
        note_paths(&answer["edxml"]["not_carried"]),
        case.not_carried(),
        "{name}"
    );
}

/// B received the document: its fields as the corpus gives them, and exported back
/// as edXML with the same steering type (0 written as 0).
async fn check_received(world: &World, b: &Agent, case: &Case, message_id: &str) {
    let folder = world.inbox_dir(B).join(message_id);
    wait_for_path(&folder.join("document.json")).await;
    let json: Value =
        serde_json::from_slice(&std::fs::read(folder.join("document.json")).unwrap()).unwrap();
    assert_eq!(
        json["business_id"], case.want["business_id"],
        "{}",
        case.name
    );
    assert_eq!(json["subject"], case.want["subject"], "{}", case.name);
    assert_eq!(
        json["steering_type"], case.want["steering_type"],
        "{}",
        case.name
    );
    let names: Vec<String> = json["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_owned())
        .collect();
    let mut want_names = sorted_strings(&case.want["attachments"]);
    let mut got_names = names.clone();
    got_names.sort();
    want_names.sort();
    assert_eq!(got_names, want_names, "{}", case.name);

    let exported = b.client.inbox_edxml(message_id).await.unwrap();
    let back = parse_document(&exported, &Limits::default()).unwrap();
    assert_eq!(
        u64::from(back.steering_type),
        case.want["steering_type"].as_u64().unwrap(),
        "{}",
        case.name
    );
    let text = String::from_utf8(exported).unwrap();
    let steering = format!(
        "<edXML:SteeringType>{}</edXML:SteeringType>",
        case.want["steering_type"]
    );
    assert!(text.contains(&steering), "{}: {text}", case.name);
}

/// A shows status `code` from B on the document it sent as `message_id`.
async fn wait_business_status(a: &Agent, message_id: &str, code: &str) {
    let view = a
        .wait_status(message_id, &format!("status {code} back at A"), |v| {
            v.recipients
                .iter()
                .any(|r| r.business.iter().any(|e| e.code == code))
        })
        .await;
    let entry = view.recipients[0]
        .business
        .iter()
        .find(|e| e.code == code)
        .unwrap();
    assert_eq!(entry.by, B);
}

async fn post_edxml(agent: &Agent, body: Vec<u8>) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/edxml", agent.api))
        .bearer_auth(&agent.token)
        .header("content-type", "application/xml")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_through_the_api() {
    let cases = corpus();
    let (documents, statuses) = split(&cases);
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;

    let mut answered = None;
    for case in documents {
        let (code, answer) = post_edxml(&a, std::fs::read(&case.path).unwrap()).await;
        if !case.accepted() {
            assert_eq!(code, 400, "{}: {answer}", case.name);
            assert_eq!(answer["error"], case.error(), "{}", case.name);
            continue;
        }
        assert_eq!(code, 202, "{}: {answer}", case.name);
        let id = check_document_answer(case, &answer);
        a.wait_status(&id, &format!("{} delivered to B", case.name), delivered)
            .await;
        check_received(&world, &b, case, &id).await;
        if case.name == ANSWERED {
            answered = Some(id);
        }
    }
    let answered = answered.expect("the answered document is in the corpus");
    for case in statuses {
        let (code, answer) = post_edxml(&b, std::fs::read(&case.path).unwrap()).await;
        if let Some(error) = case.agent_error() {
            assert_eq!(code, 400, "{}: {answer}", case.name);
            assert_eq!(answer["error"], error, "{}", case.name);
            continue;
        }
        assert_eq!(code, 202, "{}: {answer}", case.name);
        check_status_answer(case, &answer);
        wait_business_status(&a, &answered, case.want["status_code"].as_str().unwrap()).await;
    }

    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

async fn wait_file(path: &Path) -> Vec<u8> {
    wait_for_path(path).await;
    std::fs::read(path).unwrap()
}

/// Drops `case` into `drop` (written under a hidden name, renamed into place) and
/// returns what the folder answered: the `sent/NAME.json` note, or the refusal.
async fn drop_package(drop: &Path, case: &Case) -> Result<Value, String> {
    let hidden = drop.join(format!(".{}", case.name));
    std::fs::copy(&case.path, &hidden).unwrap();
    std::fs::rename(&hidden, drop.join(&case.name)).unwrap();
    let sent = drop.join("sent").join(format!("{}.json", case.name));
    let failed = drop.join("failed").join(format!("{}.error.txt", case.name));
    let mut last = None;
    let found = wait_until(
        &case.name,
        std::time::Duration::from_secs(30),
        || async { Some(sent.exists() || failed.exists()) },
        |done| *done,
        &mut last,
    )
    .await;
    assert!(found.is_some(), "{} was not taken within 30 s", case.name);
    if failed.exists() {
        return Err(String::from_utf8(wait_file(&failed).await).unwrap());
    }
    // The package moves first, then its note appears whole.
    assert!(
        drop.join("sent").join(&case.name).is_file(),
        "{}",
        case.name
    );
    Ok(serde_json::from_slice(&wait_file(&sent).await).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_through_the_drop_folder() {
    let cases = corpus();
    let (documents, statuses) = split(&cases);
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let (drop_a, drop_b) = (world.path("drop-a"), world.path("drop-b"));
    for dir in [&drop_a, &drop_b] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let mut config = world.agent_config(A, &broker.url);
    config.drop_dir = Some(drop_a.clone());
    let a = Agent::start(config).await;
    let mut config = world.agent_config(B, &broker.url);
    config.drop_dir = Some(drop_b.clone());
    let b = Agent::start(config).await;

    let mut answered = None;
    for case in documents {
        let outcome = drop_package(&drop_a, case).await;
        if !case.accepted() {
            let reason = outcome.expect_err(&case.name);
            assert_eq!(reason.trim_end(), case.error(), "{}", case.name);
            assert!(drop_a.join("failed").join(&case.name).is_file());
            continue;
        }
        let answer = outcome.unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let id = check_document_answer(case, &answer);
        a.wait_status(&id, &format!("{} delivered to B", case.name), delivered)
            .await;
        check_received(&world, &b, case, &id).await;
        if case.name == ANSWERED {
            answered = Some(id);
        }
    }
    let answered = answered.expect("the answered document is in the corpus");
    for case in statuses {
        let outcome = drop_package(&drop_b, case).await;
        if let Some(error) = case.agent_error() {
            assert_eq!(
                outcome.expect_err(&case.name).trim_end(),
                error,
                "{}",
                case.name
            );
            continue;
        }
        let answer = outcome.unwrap_or_else(|e| panic!("{}: {e}", case.name));
        check_status_answer(case, &answer);
        wait_business_status(&a, &answered, case.want["status_code"].as_str().unwrap()).await;
    }

    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

#[test]
fn corpus_through_edxml_check() {
    for case in corpus() {
        let output = Command::new(BIN)
            .args(["edxml", "check", case.path.to_str().unwrap()])
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let name = &case.name;
        if !case.accepted() {
            assert_eq!(output.status.code(), Some(1), "{name}: {output:?}");
            assert!(output.stdout.is_empty(), "{name}");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                stderr.contains(&format!("{}: {}", case.path.display(), case.error())),
                "{name}: {stderr}"
            );
            continue;
        }
        assert_eq!(output.status.code(), Some(0), "{name}: {output:?}");
        let json: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(json["kind"], case.want["kind"], "{name}");
        assert_eq!(
            note_paths(&json["not_carried"]),
            case.not_carried(),
            "{name}"
        );
        if case.is_status() {
            assert_eq!(json["status_code"], case.want["status_code"], "{name}");
            assert_eq!(json["timestamp"], case.want["timestamp"], "{name}");
            assert_eq!(
                json["response_for"]["document_id"], case.want["response_for"],
                "{name}"
            );
        } else {
            assert_eq!(json["business_id"], case.want["business_id"], "{name}");
            assert_eq!(json["subject"], case.want["subject"], "{name}");
            assert_eq!(json["steering_type"], case.want["steering_type"], "{name}");
            assert_eq!(
                json["steering_type_text"], case.want["steering_type_text"],
                "{name}"
            );
            let names: Vec<Value> = json["attachments"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["name"].clone())
                .collect();
            assert_eq!(Value::Array(names), case.want["attachments"], "{name}");
        }
    }
}
