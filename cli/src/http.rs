//! Client of an agent's local HTTP API, shared by `send`, `status`, `inbox`, the demo
//! and the tests. Errors carry the agent's own message (it names the field and rule).
//! Every request carries the agent's API token (`Authorization: Bearer`); the token is
//! never printed.

use lienthong_agent::api_types::{
    ErrorBody, InboxItem, Limits, SendRequest, SendResponse, StatusView, UploadResponse,
};
use serde::de::DeserializeOwned;

use crate::error::CliError;

#[derive(Debug, Clone)]
pub struct AgentClient {
    base: String,
    http: reqwest::Client,
}

/// Where a client finds the agent's token when no flag is given.
pub const TOKEN_FILE_ENV: &str = "LIENTHONG_API_TOKEN_FILE";

/// Reads the agent's API token from `path` (given by `--api-token-file` or
/// `LIENTHONG_API_TOKEN_FILE`). A missing file is a usage error naming both.
pub fn read_token_file(path: Option<&std::path::Path>) -> Result<String, CliError> {
    let Some(path) = path else {
        return Err(CliError::Usage(format!(
            "the agent's API needs its token: give --api-token-file FILE or set \
             {TOKEN_FILE_ENV}=FILE (the agent writes it to <data>/api-token)"
        )));
    };
    match lienthong_agent::api_guard::ApiToken::load(path) {
        Ok(token) => Ok(token.expose().to_owned()),
        Err(lienthong_agent::api_guard::TokenError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Err(CliError::Usage(format!(
                "{}: no such API token file (check --api-token-file or {TOKEN_FILE_ENV})",
                path.display()
            )))
        }
        Err(e) => Err(CliError::Usage(format!(
            "{e} (check --api-token-file or {TOKEN_FILE_ENV})"
        ))),
    }
}

impl AgentClient {
    /// `api` is the agent's base URL, e.g. `http://127.0.0.1:7180`; `token` the
    /// agent's API token, sent on every request.
    pub fn new(api: &str, token: &str) -> Result<Self, CliError> {
        if !api.starts_with("http://") && !api.starts_with("https://") {
            return Err(CliError::Usage(format!(
                "--api must be a URL such as http://127.0.0.1:7180, not {api}"
            )));
        }
        let mut authorization =
            reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                .map_err(|_| CliError::Usage("the API token is not valid header text".into()))?;
        // Kept out of debug output.
        authorization.set_sensitive(true);
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::AUTHORIZATION, authorization);
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .default_headers(headers)
            .build()
            .map_err(|e| CliError::Failed(format!("HTTP client: {e}")))?;
        Ok(Self {
            base: api.trim_end_matches('/').to_owned(),
            http,
        })
    }

    pub async fn send(&self, request: &SendRequest) -> Result<SendResponse, CliError> {
        let body = serde_json::to_vec(request)
            .map_err(|e| CliError::Failed(format!("encoding the request: {e}")))?;
        let response = self
            .post_idempotent("/v1/documents", "application/json", body)
            .await?;
        Self::decode(response).await
    }

    /// POSTs `body` with an `Idempotency-Key`, sending it again (same key) when the
    /// request fails on the way: a kept-alive connection the agent closes (its idle
    /// timeout, or room made at its connection cap) fails a request written to it at
    /// that moment, and the client cannot tell whether the agent read it. With the key
    /// a request that did arrive is answered again, not sent twice.
    async fn post_idempotent(
        &self,
        path: &str,
        content_type: &'static str,
        body: Vec<u8>,
    ) -> Result<reqwest::Response, CliError> {
        const ATTEMPTS: u32 = 3;
        let key = lienthong_proto::document::new_message_id();
        let url = format!("{}{path}", self.base);
        let mut attempt = 1;
        loop {
            let sent = self
                .http
                .post(&url)
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .header("idempotency-key", &key)
                .body(body.clone())
                .send()
                .await;
            match sent {
                // The first try may still be running at the agent: wait for its answer.
                Ok(response)
                    if attempt > 1
                        && attempt < ATTEMPTS
                        && response.status() == reqwest::StatusCode::CONFLICT => {}
                Ok(response) => return Ok(response),
                Err(error) if attempt >= ATTEMPTS => return Err(self.unreachable(error)),
                Err(error) => {
                    tracing::debug!(%error, attempt, "sending to the agent failed; retrying with the same Idempotency-Key");
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(100 * u64::from(attempt))).await;
            attempt += 1;
        }
    }

    /// Documents in the agent's inbox; with `above`, waits up to `wait_ms` for more.
    pub async fn inbox_count(&self, above: Option<u64>, wait_ms: u64) -> Result<u64, CliError> {
        let mut url = format!("{}/v1/inbox/count?wait_ms={wait_ms}", self.base);
        if let Some(above) = above {
            url.push_str(&format!("&above={above}"));
        }
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let count: lienthong_agent::api_types::InboxCount = Self::decode(response).await?;
        Ok(count.count)
    }

    /// Reports a business status for a received document.
    pub async fn report(
        &self,
        message_id: &str,
        request: &lienthong_agent::api_types::ReportRequest,
    ) -> Result<SendResponse, CliError> {
        self.post_json(&format!("/v1/inbox/{message_id}/status"), request)
            .await
    }

    /// Recalls a document this agency sent.
    pub async fn recall(&self, message_id: &str, reason: &str) -> Result<SendResponse, CliError> {
        let request = lienthong_agent::api_types::RecallRequest {
            reason: reason.to_owned(),
        };
        self.post_json(&format!("/v1/documents/{message_id}/recall"), &request)
            .await
    }

    /// The agencies registered at the broker.
    pub async fn directory(
        &self,
    ) -> Result<Vec<lienthong_agent::api_types::DirectoryEntry>, CliError> {
        let response = self
            .http
            .get(format!("{}/v1/directory", self.base))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        Self::decode(response).await
    }

    async fn post_json<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, CliError> {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        Self::decode(response).await
    }

    /// What the agent accepts.
    pub async fn limits(&self) -> Result<Limits, CliError> {
        let response = self
            .http
            .get(format!("{}/v1/limits", self.base))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        Self::decode(response).await
    }

    /// Streams a file to `POST /v1/uploads` without reading it whole; `progress` is
    /// called with the bytes sent so far.
    pub async fn upload(
        &self,
        path: &std::path::Path,
        progress: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<UploadResponse, CliError> {
        use futures_util::StreamExt as _;
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
        let size = file
            .metadata()
            .await
            .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?
            .len();
        let mut sent = 0u64;
        let stream =
            tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).map(move |chunk| {
                if let Ok(bytes) = &chunk {
                    sent += bytes.len() as u64;
                    progress(sent);
                }
                chunk
            });
        let response = self
            .http
            .post(format!("{}/v1/uploads", self.base))
            .header(reqwest::header::CONTENT_LENGTH, size)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        Self::decode(response).await
    }

    pub async fn status(&self, message_id: &str) -> Result<StatusView, CliError> {
        let response = self
            .http
            .get(format!("{}/v1/documents/{message_id}/status", self.base))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        Self::decode(response).await
    }

    /// Every document in the inbox, newest first (`GET /v1/inbox` page by page).
    pub async fn inbox(&self) -> Result<Vec<InboxItem>, CliError> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut url = format!("{}/v1/inbox?limit=1000", self.base);
            if let Some(cursor) = &cursor {
                url.push_str("&cursor=");
                url.push_str(cursor);
            }
            let response = self
                .http
                .get(url)
                .send()
                .await
                .map_err(|e| self.unreachable(e))?;
            let page: lienthong_agent::api_types::Page<InboxItem> = Self::decode(response).await?;
            items.extend(page.items);
            if !page.more || page.next_cursor.is_none() {
                break;
            }
            cursor = page.next_cursor;
        }
        items.reverse();
        Ok(items)
    }

    /// `POST /v1/edxml`: sends an edXML package (document or status message).
    pub async fn send_edxml(&self, package: Vec<u8>) -> Result<SendResponse, CliError> {
        let response = self
            .post_idempotent("/v1/edxml", "application/xml", package)
            .await?;
        Self::decode(response).await
    }

    /// `GET /v1/inbox/{id}/edxml`: a received document as an edXML package.
    pub async fn inbox_edxml(&self, message_id: &str) -> Result<Vec<u8>, CliError> {
        let response = self
            .http
            .get(format!("{}/v1/inbox/{message_id}/edxml", self.base))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if !response.status().is_success() {
            return Self::decode::<serde_json::Value>(response)
                .await
                .and(Err(CliError::Failed("the agent refused the export".into())));
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| CliError::Failed(format!("reading the agent's answer: {e}")))?;
        Ok(body.to_vec())
    }

    fn unreachable(&self, error: reqwest::Error) -> CliError {
        CliError::Failed(format!(
            "cannot reach the agent at {}: {error} (is `lienthong agent` running there?)",
            self.base
        ))
    }

    async fn decode<T: DeserializeOwned>(response: reqwest::Response) -> Result<T, CliError> {
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| CliError::Failed(format!("reading the agent's answer: {e}")))?;
        if status.is_success() {
            serde_json::from_slice(&body)
                .map_err(|e| CliError::Failed(format!("unexpected answer from the agent: {e}")))
        } else {
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            if status == reqwest::StatusCode::UNAUTHORIZED {
                Err(CliError::Failed(format!(
                    "the agent refused the API token: check --api-token-file or {TOKEN_FILE_ENV} ({message})"
                )))
            } else if status.is_client_error() && status != reqwest::StatusCode::NOT_FOUND {
                Err(CliError::Failed(format!("refused by the agent: {message}")))
            } else {
                Err(CliError::Failed(format!(
                    "the agent answered {status}: {message}"
                )))
            }
        }
    }
}
