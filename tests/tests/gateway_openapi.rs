//! `openapi.json` against the live router (issue 13): every documented path and
//! method is served by the real agent (its own handler answers, not the router's
//! fallback), and the document the agent serves is the one in the source.
//! (Both directions against the guard's route table are checked in the agent's unit
//! tests; a route missing from that table is refused, never served.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lienthong_tests::*;
use reqwest::header::CONTENT_TYPE;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_is_served_by_the_agent() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let (name, value) = bearer(&a.token);
    let client = reqwest::Client::new();
    let served: serde_json::Value = client
        .get(format!("{}/openapi.json", a.api))
        .header(name.clone(), value.clone())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut checked = 0;
    for (path, item) in served["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let concrete = path
                .replace("{id}", "01900000-0000-7000-8000-000000000000")
                .replace("{name}", "x.pdf");
            let url = format!("{}{concrete}", a.api);
            let request = match method.as_str() {
                "get" => client.get(&url),
                "post" => {
                    let media = operation["requestBody"]["content"]
                        .as_object()
                        .and_then(|c| c.keys().next().cloned())
                        .unwrap_or_else(|| "application/json".into());
                    client.post(&url).header(CONTENT_TYPE, media).body("{}")
                }
                other => panic!("{path}: method {other} is not one the API uses"),
            };
            let response = request
                .header(name.clone(), value.clone())
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body = response.bytes().await.unwrap();
            assert_ne!(status, 405, "{method} {path}: not routed");
            if status == 404 {
                // Our handler's 404 names what is missing; the router's fallback is empty.
                let error: serde_json::Value = serde_json::from_slice(&body)
                    .unwrap_or_else(|_| panic!("{method} {path}: the router's 404"));
                assert!(error["error"].is_string(), "{method} {path}: {error}");
            }
            checked += 1;
        }
    }
    // As many operations as the guard's route table (the unit test compares them).
    assert_eq!(checked, lienthong_agent::api_guard::ROUTES.len());
    a.stop().await;
    broker.stop().await;
}
