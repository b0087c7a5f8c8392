//! edXML (QCVN 102:2016) end to end: packages sent through `POST /v1/edxml`, the drop
//! folder and `lienthong send --edxml`, received documents and status reports exported
//! back as packages, and invalid packages refused naming the field and the rule.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use lienthong_agent::api_types::{SendResponse, StatusView};
use lienthong_edxml::{
    EdxmlAttachment, EdxmlDocument, EdxmlStatus, Limits, ResponseFor, Signer, StaffInfo,
    parse_document, parse_message, parse_status, write_document, write_status,
};
use lienthong_tests::*;

const BIN: &str = env!("CARGO_BIN_EXE_lienthong-under-test");

fn corpus(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../edxml/tests/corpus")
        .join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "edxml"))
        .collect();
    files.sort();
    files
}

fn corpus_file(dir: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../edxml/tests/corpus")
        .join(dir)
        .join(name)
}

fn delivered(view: &StatusView) -> bool {
    !view.recipients.is_empty() && view.recipients.iter().all(|r| r.state == "delivered")
}

/// A document package from A to B with every commonly used field and two attachments,
/// exactly as a parser returns it.
fn package(number: &str, subject: &str) -> EdxmlDocument {
    let pdf: Vec<u8> = (0..150_000u32).map(|i| (i * 13 % 251) as u8).collect();
    let doc = EdxmlDocument {
        sender: A.into(),
        sender_name: "Ủy ban nhân dân tỉnh".into(),
        recipients: vec![B.into()],
        number: number.into(),
        notation: "UBND-VP".into(),
        document_type: "1".into(),
        document_type_name: "Công văn".into(),
        subject: subject.into(),
        content: "Nội dung & ghi chú <quan trọng>".into(),
        issue_place: "Hưng Yên".into(),
        issue_date: "2026/05/04".into(),
        signer: Signer {
            competence: "TM. UBND".into(),
            position: "Chủ tịch".into(),
            full_name: "Nguyễn Văn A".into(),
        },
        priority: 2,
        steering_type: 2,
        due_date: Some("2026/05/20".into()),
        to_places: vec!["Như trên".into(), "Lưu: VT".into()],
        attachments: vec![
            EdxmlAttachment {
                name: "Quyết định số 12.pdf".into(),
                media_type: "application/pdf".into(),
                content_id: "a1".into(),
                description: String::new(),
                bytes: pdf,
            },
            EdxmlAttachment {
                name: "Phụ lục.txt".into(),
                media_type: "text/plain".into(),
                content_id: "a2".into(),
                description: "Phụ lục".into(),
                bytes: "phụ lục – tiếng Việt".as_bytes().to_vec(),
            },
        ],
        ..EdxmlDocument::default()
    };
    parse_document(&write_document(&doc).unwrap(), &Limits::default()).unwrap()
}

/// Posts raw bytes to `POST /v1/edxml` of `agent`; returns the status and the body.
async fn post_edxml(agent: &Agent, body: Vec<u8>) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/edxml", agent.api))
        .bearer_auth(&agent.token)
        .header("content-type", "application/xml")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn package_posted_to_the_api_arrives_whole_and_exports_back_as_edxml() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;

    let doc = package("12", "Về việc triển khai liên thông văn bản");
    let sent = a
        .client
        .send_edxml(write_document(&doc).unwrap())
        .await
        .unwrap();
    assert_eq!(sent.business_id, "000.00.00.H31,2026/05/04,12/UBND-VP");
    a.wait_status(&sent.message_id, "delivered to B", delivered)
        .await;

    // The attachments arrive byte for byte, the header fields mapped.
    let folder = world.inbox_dir(B).join(&sent.message_id);
    wait_for_path(&folder).await;
    for attachment in &doc.attachments {
        assert_eq!(
            std::fs::read(folder.join(&attachment.name)).unwrap(),
            attachment.bytes,
            "{}",
            attachment.name
        );
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("document.json")).unwrap()).unwrap();
    assert_eq!(json["sender"], A);
    assert_eq!(json["recipients"], serde_json::json!([B]));
    assert_eq!(json["business_id"], sent.business_id.as_str());
    assert_eq!(json["number"], "12");
    assert_eq!(json["notation"], "UBND-VP");
    assert_eq!(json["subject"], doc.subject.as_str());
    assert_eq!(json["content"], doc.content.as_str());
    assert_eq!(json["issue_place"], "Hưng Yên");
    assert_eq!(json["issue_date"], "2026/05/04");
    assert_eq!(json["document_type_name"], "Công văn");
    assert_eq!(json["priority"], 2);
    assert_eq!(json["steering_type"], 2);
    assert_eq!(json["signer"]["full_name"], "Nguyễn Văn A");
    assert_eq!(json["sender_name"], "Ủy ban nhân dân tỉnh");

    // Exported back at B, the package carries the same document.
    let exported = b.client.inbox_edxml(&sent.message_id).await.unwrap();
    let back = parse_document(&exported, &Limits::default()).unwrap();
    assert_eq!(back.sender, doc.sender);
    assert_eq!(back.recipients, doc.recipients);
    assert_eq!(back.subject, doc.subject);
    assert_eq!(back.number, doc.number);
    assert_eq!(back.notation, doc.notation);
    assert_eq!(back.content, doc.content);
    assert_eq!(back.issue_place, doc.issue_place);
    assert_eq!(back.issue_date, doc.issue_date);
    assert_eq!(back.signer, doc.signer);
    assert_eq!(back.priority, doc.priority);
    assert_eq!(back.steering_type, doc.steering_type);
    assert_eq!(back.due_date, doc.due_date);
    assert_eq!(back.to_places, doc.to_places);
    assert_eq!(back.sender_name, doc.sender_name);
    assert_eq!(back.business_id(), sent.business_id);
    let names_and_bytes = |d: &EdxmlDocument| {
        d.attachments
            .iter()
            .map(|a| (a.name.clone(), a.media_type.clone(), a.bytes.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(names_and_bytes(&back), names_and_bytes(&doc));

    // Unknown ids are a 404; A never received it.
    let unknown = a.client.inbox_edxml(&sent.message_id).await.unwrap_err();
    assert!(unknown.to_string().contains("404"), "{unknown}");

    // B answers with an edXML status message: A sees it in the document's history and
    // exports the signed report back as an edXML status message.
    let status = EdxmlStatus {
        from: B.into(),
        from_name: "Sở Nội vụ".into(),
        response_for: ResponseFor {
            organ_id: A.into(),
            code: "12/UBND-VP".into(),
            promulgation_date: "2026/05/04".into(),
            document_id: sent.business_id.clone(),
        },
        status_code: "03".into(),
        description: None,
        timestamp: "2026/05/05 08:00:00".into(),
        staff: Some(StaffInfo {
            staff: "Trần Thị B".into(),
            ..StaffInfo::default()
        }),
    };
    let reported = b
        .client
        .send_edxml(write_status(&status).unwrap())
        .await
        .unwrap();
    let view = a
        .wait_status(&sent.message_id, "status 03 back at A", |v| {
            v.recipients
                .iter()
                .any(|r| r.business.iter().any(|e| e.code == "03"))
        })
        .await;
    let entry = view.recipients[0]
        .business
        .iter()
        .find(|e| e.code == "03")
        .unwrap();
    assert_eq!(entry.by, B);
    assert_eq!(entry.staff.as_deref(), Some("Trần Thị B"));
    assert_eq!(
        entry.report_id.as_deref(),
        Some(reported.message_id.as_str())
    );
    let exported = a.client.inbox_edxml(&reported.message_id).await.unwrap();
    let back = parse_status(&exported, &Limits::default()).unwrap();
    assert_eq!(back.from, B);
    assert_eq!(back.status_code, "03");
    assert_eq!(back.response_for, status.response_for);
    assert_eq!(back.staff.unwrap().staff, "Trần Thị B");

    // A status about a document B never received names the field.
    let mut unknown = status.clone();
    unknown.response_for.document_id = "000.00.00.H31,2026/05/04,99/UBND-VP".into();
    unknown.response_for.code = "99/UBND-VP".into();
    let (code, body) = post_edxml(&b, write_status(&unknown).unwrap()).await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("Status/ResponseFor/DocumentId"), "{body}");

    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recall_package_refers_to_the_document_sent_under_its_id() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;

    let doc = package("15", "Văn bản sẽ thu hồi");
    let sent = a
        .client
        .send_edxml(write_document(&doc).unwrap())
        .await
        .unwrap();
    a.wait_status(&sent.message_id, "delivered to B", delivered)
        .await;

    // The corpus recall names its document by Bussiness/DocumentId; point it at ours.
    let text = std::fs::read_to_string(corpus_file("valid", "recall.edxml")).unwrap();
    let mut recall = parse_document(text.as_bytes(), &Limits::default()).unwrap();
    assert_eq!(recall.business_type, 1);
    recall.business_document_id = Some(sent.business_id.clone());
    recall.sender = A.into();
    recall.recipients = vec![B.into()];
    let recalled = a
        .client
        .send_edxml(write_document(&recall).unwrap())
        .await
        .unwrap();
    a.wait_status(&recalled.message_id, "recall delivered to B", delivered)
        .await;
    wait_for_path(&world.inbox_dir(B).join("recalled").join(&sent.message_id)).await;

    // A recall of a document this agency never sent is refused, naming the field.
    recall.business_document_id = Some("000.00.00.H31,2026/05/04,77/UBND-VP".into());
    let (code, body) = post_edxml(&a, write_document(&recall).unwrap()).await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("TraceHeaderList/Bussiness/DocumentId"),
        "{body}"
    );

    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_packages_are_refused_naming_the_field_and_rule() {
    let world = World::new();
    // No broker is needed to refuse a package.
    let a = Agent::start(world.agent_config(A, "https://localhost:1")).await;
    let files = corpus("invalid");
    assert!(
        files.len() >= 20,
        "corpus/invalid has {} files",
        files.len()
    );
    for path in files {
        let bytes = std::fs::read(&path).unwrap();
        let expected = parse_message(&bytes, &Limits::default()).unwrap_err();
        let (code, body) = post_edxml(&a, bytes).await;
        assert_eq!(code, 400, "{}: {body}", path.display());
        let error: serde_json::Value = serde_json::from_str(&body).unwrap();
        let message = error["error"].as_str().unwrap();
        assert_eq!(message, expected.to_string(), "{}", path.display());
        if let Some(field) = expected.path() {
            assert!(message.starts_with(field), "{}: {message}", path.display());
        }
    }

    // A valid package from another agency: this agent signs only its own.
    let mut other = package("3", "Văn bản của cơ quan khác");
    other.sender = C.into();
    let (code, body) = post_edxml(&a, write_document(&other).unwrap()).await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("MessageHeader/From/OrganId"), "{body}");

    // Nothing refused was stored.
    let metrics = reqwest::Client::new()
        .get(format!("{}/metrics", a.api))
        .bearer_auth(&a.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for state in ["outbox", "submitted", "failed"] {
        let line = format!("lienthong_agent_outbox_documents{{state=\"{state}\"}} 0");
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }

    a.stop().await;
}

async fn wait_file(path: &Path) -> Vec<u8> {
    wait_for_path(path).await;
    std::fs::read(path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_folder_sends_packages_and_sets_aside_invalid_ones() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let drop = world.path("drop");
    let mut config = world.agent_config(A, &broker.url);
    config.drop_dir = Some(drop.clone());
    let a = Agent::start(config).await;
    let _b = Agent::start(world.agent_config(B, &broker.url)).await;
    std::fs::create_dir_all(&drop).unwrap();

    // A writer that writes under a hidden name and renames into place.
    let doc = package("21", "Văn bản qua thư mục");
    std::fs::write(drop.join(".cong-van.edxml"), write_document(&doc).unwrap()).unwrap();
    std::fs::rename(drop.join(".cong-van.edxml"), drop.join("cong-van.edxml")).unwrap();
    // An invalid package, and a hidden file left alone.
    std::fs::copy(
        corpus_file("invalid", "subject-too-long.edxml"),
        drop.join("bad.edxml"),
    )
    .unwrap();
    std::fs::write(drop.join(".in-progress.edxml"), b"<edXML").unwrap();

    let note = wait_file(&drop.join("sent/cong-van.edxml.json")).await;
    let response: SendResponse = serde_json::from_slice(&note).unwrap();
    assert_eq!(response.business_id, doc.business_id());
    assert!(drop.join("sent/cong-van.edxml").is_file());
    assert!(!drop.join("cong-van.edxml").exists());
    let folder = world.inbox_dir(B).join(&response.message_id);
    wait_for_path(&folder).await;
    assert_eq!(
        std::fs::read(folder.join(&doc.attachments[0].name)).unwrap(),
        doc.attachments[0].bytes
    );

    let reason = wait_file(&drop.join("failed/bad.edxml.error.txt")).await;
    let reason = String::from_utf8(reason).unwrap();
    assert!(reason.contains("MessageHeader/Subject"), "{reason}");
    assert!(reason.contains("at most 500 characters"), "{reason}");
    assert!(drop.join("failed/bad.edxml").is_file());
    assert!(!drop.join("bad.edxml").exists());
    assert!(drop.join(".in-progress.edxml").is_file());

    // The same name again is filed next to the first, not over it.
    std::fs::write(
        drop.join("cong-van.edxml"),
        write_document(&package("22", "Văn bản thứ hai")).unwrap(),
    )
    .unwrap();
    let note = wait_file(&drop.join("sent/cong-van-1.edxml.json")).await;
    let second: SendResponse = serde_json::from_slice(&note).unwrap();
    assert_ne!(second.message_id, response.message_id);
    assert!(drop.join("sent/cong-van.edxml").is_file());

    a.stop().await;
    broker.stop().await;
}

fn run_cli(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

#[test]
fn cli_check_prints_the_header_or_names_the_broken_rule() {
    let valid = corpus_file("valid", "attachments-vietnamese-names.edxml");
    let output = run_cli(&["edxml", "check", valid.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let doc = parse_document(&std::fs::read(&valid).unwrap(), &Limits::default()).unwrap();
    assert_eq!(json["kind"], "document");
    assert_eq!(json["subject"], doc.subject.as_str());
    assert_eq!(json["sender"], A);
    assert_eq!(json["business_id"], doc.business_id().as_str());
    let attachments = json["attachments"].as_array().unwrap();
    assert_eq!(attachments.len(), doc.attachments.len());
    assert_eq!(attachments[0]["name"], doc.attachments[0].name.as_str());
    assert_eq!(attachments[0]["size"], doc.attachments[0].bytes.len());

    let status = corpus_file("valid", "status-refused.status.edxml");
    let output = run_cli(&["edxml", "check", status.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["kind"], "status");
    assert_eq!(json["status_code"], "02");

    let invalid = corpus_file("invalid", "code-number-too-long.edxml");
    let output = run_cli(&["edxml", "check", invalid.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("MessageHeader/Code/CodeNumber"), "{stderr}");
    assert!(stderr.contains("at most 11 characters"), "{stderr}");

    let output = run_cli(&["edxml", "check", "/nonexistent/x.edxml"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_sends_a_package_and_exports_the_received_document() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;

    let valid = corpus_file("valid", "attachments-vietnamese-names.edxml");
    let (api_a, api_b) = (a.api.clone(), b.api.clone());
    let token_a = a.token_file.display().to_string();
    let token_b = b.token_file.display().to_string();
    let path = valid.clone();
    let token = token_a.clone();
    let output = tokio::task::spawn_blocking(move || {
        run_cli(&[
            "send",
            "--api",
            &api_a,
            "--api-token-file",
            &token,
            "--edxml",
            path.to_str().unwrap(),
        ])
    })
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let id = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    a.wait_status(&id, "delivered to B", delivered).await;
    wait_for_path(&world.inbox_dir(B).join(&id)).await;

    let out = world.path("exported.edxml");
    let (out_arg, id_arg) = (out.to_str().unwrap().to_owned(), id.clone());
    let output = tokio::task::spawn_blocking(move || {
        run_cli(&[
            "edxml",
            "export",
            "--api",
            &api_b,
            "--api-token-file",
            &token_b,
            &id_arg,
            "--out",
            &out_arg,
        ])
    })
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let original = parse_document(&std::fs::read(&valid).unwrap(), &Limits::default()).unwrap();
    let back = parse_document(&std::fs::read(&out).unwrap(), &Limits::default()).unwrap();
    assert_eq!(back.subject, original.subject);
    assert_eq!(back.business_id(), original.business_id());
    assert_eq!(back.attachments.len(), original.attachments.len());
    for (x, y) in back.attachments.iter().zip(&original.attachments) {
        assert_eq!((&x.name, &x.bytes), (&y.name, &y.bytes));
    }

    // An invalid package exits 1 naming the field; --edxml excludes --to.
    let invalid = corpus_file("invalid", "recipient-bad-agency-code.edxml");
    let api_a = a.api.clone();
    let output = tokio::task::spawn_blocking(move || {
        run_cli(&[
            "send",
            "--api",
            &api_a,
            "--api-token-file",
            &token_a,
            "--edxml",
            invalid.to_str().unwrap(),
        ])
    })
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("MessageHeader/To/OrganId"), "{stderr}");
    let output = run_cli(&["send", "--edxml", "x.edxml", "--to", B]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");

    a.stop().await;
    b.stop().await;
    broker.stop().await;
}
