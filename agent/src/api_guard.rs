//! Who may use the agent's local HTTP API: the bearer token, the `Host`, `Origin` and
//! `Sec-Fetch-Site` rules, and the `Content-Type` each body must carry.
//!
//! Owns [`ROUTES`], the one table of every route the API serves (method, path pattern,
//! body kind, whether it needs the token). The guard looks every request up in it by
//! the path axum matched, so a route added to the router without a line here is
//! refused (405) rather than served unguarded, and the tests walk this table.
//!
//! Invariants:
//! - Every route but `/healthz` needs `Authorization: Bearer <token>`; a missing or
//!   wrong token is a `401` with `WWW-Authenticate: Bearer` and an [`ErrorBody`].
//! - The token is compared in constant time (HMAC-SHA-256 under a key drawn at start,
//!   verified with `ring::hmac::verify`), so neither its bytes nor its length leak.
//! - A `Host` that is not the bound address, `localhost` or a configured name, any
//!   `Origin` that is not the API's own, and a `Sec-Fetch-Site` other than
//!   `same-origin`/`none` are refused with `403` naming the rule, on every route (these
//!   are what a web page or a DNS-rebinding attack sends, never our clients).
//! - A body route refuses a missing or wrong `Content-Type` with `415` before its
//!   handler reads a byte: a cross-site form can only send `text/plain`,
//!   `application/x-www-form-urlencoded` or `multipart/form-data`.
//! - The token file is created `0600` with `create_new` (no window where it is
//!   readable by others, no overwrite of a file created concurrently) and refused when
//!   it is group- or world-accessible or not a regular file. The token is never logged.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Json;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::{debug, info};

use crate::api_types::ErrorBody;

/// The default token file's name inside the data directory.
pub const TOKEN_FILE_NAME: &str = "api-token";

/// What a route's request body must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No body is read.
    None,
    /// `application/json`.
    Json,
    /// `application/octet-stream` (raw file bytes).
    OctetStream,
    /// `application/xml` or `text/xml` (an edXML package).
    Xml,
}

impl BodyKind {
    /// The media types accepted (compared case-insensitively, parameters ignored).
    pub fn media_types(self) -> &'static [&'static str] {
        match self {
            BodyKind::None => &[],
            BodyKind::Json => &["application/json"],
            BodyKind::OctetStream => &["application/octet-stream"],
            BodyKind::Xml => &["application/xml", "text/xml"],
        }
    }
}

/// One route of the local API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiRoute {
    /// `GET` or `POST` (a `GET` route also answers `HEAD`).
    pub method: &'static str,
    /// The axum path pattern, e.g. `/v1/inbox/{id}`.
    pub path: &'static str,
    pub body: BodyKind,
    /// Served without the token (only `/healthz`: it says "ok" and nothing else).
    pub open: bool,
}

const fn route(method: &'static str, path: &'static str, body: BodyKind) -> ApiRoute {
    ApiRoute {
        method,
        path,
        body,
        open: false,
    }
}

/// Every route of the local API. The router in `api.rs`/`edxml_api.rs` and the
/// OpenAPI document must list exactly these (the tests check both).
pub const ROUTES: &[ApiRoute] = &[
    route("POST", "/v1/documents", BodyKind::Json),
    route("POST", "/v1/documents/batch", BodyKind::Json),
    route("POST", "/v1/uploads", BodyKind::OctetStream),
    route("GET", "/v1/limits", BodyKind::None),
    route("GET", "/v1/documents/{id}/status", BodyKind::None),
    route("POST", "/v1/documents/{id}/recall", BodyKind::Json),
    route("GET", "/v1/inbox", BodyKind::None),
    route("GET", "/v1/inbox/count", BodyKind::None),
    route("GET", "/v1/inbox/{id}", BodyKind::None),
    route("GET", "/v1/inbox/{id}/attachments/{name}", BodyKind::None),
    route("GET", "/v1/sent", BodyKind::None),
    route("POST", "/v1/inbox/{id}/status", BodyKind::Json),
    route("GET", "/v1/inbox/{id}/edxml", BodyKind::None),
    route("POST", "/v1/edxml", BodyKind::Xml),
    route("GET", "/v1/directory", BodyKind::None),
    route("GET", "/readyz", BodyKind::None),
    route("GET", "/metrics", BodyKind::None),
    route("GET", "/openapi.json", BodyKind::None),
    ApiRoute {
        method: "GET",
        path: "/healthz",
        body: BodyKind::None,
        open: true,
    },
];

/// The declared route for a method and matched path (`HEAD` is looked up as `GET`).
pub fn find_route(method: &Method, path: &str) -> Option<&'static ApiRoute> {
    let method = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    ROUTES.iter().find(|r| r.method == method && r.path == path)
}

/// Why the token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: the API token file is readable or writable by others (mode {mode:04o}); \
         it must be 0600 or stricter: chmod 600 {path}"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{path}: the API token file is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path}: {detail}")]
    BadToken { path: PathBuf, detail: &'static str },
}

/// Shortest and longest token accepted from a file someone wrote by hand.
const MIN_TOKEN_CHARS: usize = 32;
const MAX_TOKEN_CHARS: usize = 512;

/// The API's bearer token. Its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct ApiToken {
    value: String,
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(..)")
    }
}

impl ApiToken {
    /// The token text, to send as `Authorization: Bearer <token>`.
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// Reads the token from `path`, or creates the file (and its directory, 0700) with
    /// 32 random bytes in hex, mode 0600, when it does not exist. Blocking.
    pub fn load_or_create(path: &Path) -> Result<Self, TokenError> {
        let io = |source| TokenError::Io {
            path: path.to_owned(),
            source,
        };
        match Self::load(path) {
            Err(TokenError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            }
            other => return other,
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
        }
        let mut bytes = [0u8; 32];
        rand::fill(&mut bytes);
        let value = hex::encode(bytes);
        // create_new: never truncate or follow a file someone else created meanwhile;
        // mode 0600 from the start, so there is no moment others could read it.
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path);
        let mut file = match created {
            Ok(file) => file,
            // Another process created it between our read and our create: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Self::load(path),
            Err(e) => return Err(io(e)),
        };
        let written = file
            .write_all(format!("{value}\n").as_bytes())
            .and_then(|()| file.sync_all());
        if let Err(e) = written {
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(io(e));
        }
        info!(path = %path.display(), "created the API token file");
        Ok(Self { value })
    }

    /// Reads the token from an existing file, refusing one that others may read.
    pub fn load(path: &Path) -> Result<Self, TokenError> {
        let io = |source| TokenError::Io {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // The checks are on the file we opened, not on the path: no swap in between.
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(TokenError::NotAFile {
                path: path.to_owned(),
            });
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(TokenError::TooOpen {
                path: path.to_owned(),
                mode,
            });
        }
        let mut text = String::new();
        file.take(MAX_TOKEN_CHARS as u64 + 64)
            .read_to_string(&mut text)
            .map_err(io)?;
        let value = text.trim();
        let bad = |detail| TokenError::BadToken {
            path: path.to_owned(),
            detail,
        };
        if value.len() < MIN_TOKEN_CHARS {
            return Err(bad(
                "the API token must be at least 32 characters (delete the file and the agent creates a new one)",
            ));
        }
        if value.len() > MAX_TOKEN_CHARS {
            return Err(bad("the API token must be at most 512 characters"));
        }
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad(
                "the API token must be printable ASCII without spaces (e.g. hex)",
            ));
        }
        Ok(Self {
            value: value.to_owned(),
        })
    }
}

/// The token file an agent uses: the configured one, else `<data>/api-token`.
pub fn token_path(configured: Option<&Path>, data_dir: &Path) -> PathBuf {
    configured
        .map(Path::to_owned)
        .unwrap_or_else(|| data_dir.join(TOKEN_FILE_NAME))
}

/// What the guard checks requests against.
#[derive(Clone)]
pub(crate) struct Guard {
    inner: Arc<GuardInner>,
}

struct GuardInner {
    /// HMAC key drawn at start; `tag` = HMAC(key, token).
    key: ring::hmac::Key,
    tag: ring::hmac::Tag,
    /// Accepted `Host` values, lower case, with and without the port.
    hosts: Vec<String>,
    /// Accepted `Origin` values: `scheme://host[:port]` for each host.
    origins: Vec<String>,
}

impl Guard {
    /// `bound` is the listener's address; `names` extra host names (for an API bound
    /// off loopback); `tls` whether the API speaks HTTPS (its origin's scheme).
    pub(crate) fn new(token: &ApiToken, bound: SocketAddr, names: &[String], tls: bool) -> Self {
        let rng = ring::rand::SystemRandom::new();
        let key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng).unwrap_or_else(|_| {
            // The system RNG failed: fall back to a key from rand's generator; the
            // HMAC only hides timing, its key need not survive anything.
            let mut bytes = [0u8; 32];
            rand::fill(&mut bytes);
            ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes)
        });
        let tag = ring::hmac::sign(&key, token.expose().as_bytes());
        let port = bound.port();
        let mut bases: Vec<String> = vec!["localhost".into()];
        let mut add_ip = |ip: IpAddr| {
            bases.push(match ip {
                IpAddr::V4(v4) => v4.to_string(),
                IpAddr::V6(v6) => format!("[{v6}]"),
            });
        };
        match bound.ip() {
            ip if ip.is_unspecified() => {
                // Bound to every address: loopback reaches it too.
                add_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
                if ip.is_ipv6() {
                    add_ip(IpAddr::V6(Ipv6Addr::LOCALHOST));
                }
            }
            ip => add_ip(ip),
        }
        for name in names {
            let name = name.trim().to_ascii_lowercase();
            if !name.is_empty() {
                bases.push(name);
            }
        }
        let mut hosts = Vec::with_capacity(bases.len().saturating_mul(2));
        for base in &bases {
            hosts.push(base.clone());
            hosts.push(format!("{base}:{port}"));
        }
        let scheme = if tls { "https" } else { "http" };
        let origins = hosts.iter().map(|h| format!("{scheme}://{h}")).collect();
        Self {
            inner: Arc::new(GuardInner {
                key,
                tag,
                hosts,
                origins,
            }),
        }
    }

    fn token_matches(&self, presented: &str) -> bool {
        ring::hmac::verify(
            &self.inner.key,
            presented.as_bytes(),
            self.inner.tag.as_ref(),
        )
        .is_ok()
    }
}

fn refuse(status: StatusCode, error: String) -> Response {
    (status, Json(ErrorBody { error })).into_response()
}

/// The rule a request's `Host`, `Origin` or `Sec-Fetch-Site` breaks, if any.
fn cross_site_rule(guard: &Guard, request: &Request) -> Option<String> {
    let headers = request.headers();
    let host = match headers.get(header::HOST) {
        Some(value) => value.to_str().ok().map(str::to_ascii_lowercase),
        // HTTP/1.1 requires Host; an absolute-form request carries it in the URI.
        None => request
            .uri()
            .authority()
            .map(|a| a.as_str().to_ascii_lowercase()),
    };
    match host {
        Some(host) if guard.inner.hosts.contains(&host) => {}
        Some(host) => {
            return Some(format!(
                "Host {:?} is not this agent's API address (localhost or the address it is bound to): requests for other host names are refused (DNS rebinding)",
                shorten(&host)
            ));
        }
        None => {
            return Some("a Host header naming this agent's API address is required".into());
        }
    }
    if let Some(authority) = request.uri().authority() {
        let authority = authority.as_str().to_ascii_lowercase();
        if !guard.inner.hosts.contains(&authority) {
            return Some(format!(
                "request target {:?} is not this agent's API address",
                shorten(&authority)
            ));
        }
    }
    for origin in headers.get_all(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("").to_ascii_lowercase();
        if !guard.inner.origins.contains(&origin) {
            return Some(format!(
                "Origin {:?} is not this agent's API: cross-site requests are refused",
                shorten(&origin)
            ));
        }
    }
    for site in headers.get_all("sec-fetch-site") {
        let site = site.to_str().unwrap_or("").to_ascii_lowercase();
        if site != "same-origin" && site != "none" {
            return Some(format!(
                "Sec-Fetch-Site {:?}: only same-origin or none is accepted; cross-site requests are refused",
                shorten(&site)
            ));
        }
    }
    None
}

/// At most 100 characters of what a client sent, for an error message.
fn shorten(text: &str) -> String {
    text.chars().take(100).collect()
}

/// The bearer token of `Authorization: Bearer <token>` (scheme case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn unauthorized(error: &str, detail: &str) -> Response {
    let mut response = refuse(StatusCode::UNAUTHORIZED, detail.to_owned());
    let challenge = if error.is_empty() {
        "Bearer realm=\"lienthong-agent\"".to_owned()
    } else {
        format!("Bearer realm=\"lienthong-agent\", error=\"{error}\"")
    };
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

/// The media type of a `Content-Type` value: lower case, parameters dropped.
fn essence(value: &HeaderValue) -> Option<String> {
    let text = value.to_str().ok()?;
    let essence = text.split(';').next().unwrap_or("").trim();
    Some(essence.to_ascii_lowercase())
}

/// The middleware: cross-site rules, then the token, then the route table and the
/// body's media type. Adds `nosniff` and `no-store` to every answer.
pub(crate) async fn guard(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    let mut response = check(&guard, request, next).await;
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn check(guard: &Guard, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let matched = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned());
    if let Some(rule) = cross_site_rule(guard, &request) {
        info!(method = %method, path = ?matched, rule = %rule, "API request refused");
        return refuse(StatusCode::FORBIDDEN, rule);
    }
    let declared = matched.as_deref().and_then(|p| find_route(&method, p));
    if !declared.is_some_and(|r| r.open) {
        match bearer(request.headers()) {
            None => {
                debug!(method = %method, path = ?matched, "API request without a token");
                return unauthorized(
                    "",
                    "this API needs the agent's token: send Authorization: Bearer <token> \
                     (the token is in the agent's api-token file)",
                );
            }
            Some(token) if !guard.token_matches(token) => {
                info!(method = %method, path = ?matched, "API request with a wrong token");
                return unauthorized(
                    "invalid_token",
                    "the API token is wrong: use the one in the agent's api-token file",
                );
            }
            Some(_) => {}
        }
    }
    let Some(path) = matched else {
        // No route matched: the router answers 404 (after the token, so that the
        // routes are not revealed to anyone without it).
        return next.run(request).await;
    };
    let Some(route) = declared else {
        return refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not served on {path}"),
        );
    };
    let accepted = route.body.media_types();
    if !accepted.is_empty() {
        let given = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(essence);
        if !given.as_deref().is_some_and(|g| accepted.contains(&g)) {
            return refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "{} {} takes Content-Type {}, not {}",
                    route.method,
                    route.path,
                    accepted.join(" or "),
                    given
                        .as_deref()
                        .map(shorten)
                        .unwrap_or_else(|| "none".into())
                ),
            );
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"))
    }

    #[test]
    fn creates_a_private_token_and_reads_it_back() {
        let dir = tempdir();
        let path = dir.path().join("sub/api-token");
        let created = ApiToken::load_or_create(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(created.expose().len(), 64);
        assert!(created.expose().bytes().all(|b| b.is_ascii_hexdigit()));
        let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(meta.mode() & 0o777, 0o600);
        let dir_meta = std::fs::metadata(dir.path().join("sub")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(dir_meta.mode() & 0o777, 0o700);
        let again = ApiToken::load_or_create(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again.expose(), created.expose());
        assert_eq!(format!("{again:?}"), "ApiToken(..)");
    }

    #[test]
    fn refuses_open_short_and_odd_token_files() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempdir();
        let path = dir.path().join("api-token");
        std::fs::write(&path, "a".repeat(64)).unwrap_or_else(|e| panic!("{e}"));
        for mode in [0o644, 0o640, 0o604, 0o620] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .unwrap_or_else(|e| panic!("{e}"));
            let err = ApiToken::load_or_create(&path).map(|_| ()).unwrap_err();
            assert!(matches!(err, TokenError::TooOpen { .. }), "{mode:o}: {err}");
            assert!(err.to_string().contains(&path.display().to_string()));
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&path, "short").unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            ApiToken::load(&path),
            Err(TokenError::BadToken { .. })
        ));
        std::fs::write(&path, format!("{} {}", "a".repeat(20), "b".repeat(20)))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            ApiToken::load(&path),
            Err(TokenError::BadToken { .. })
        ));
        let not_file = dir.path().join("dir");
        std::fs::create_dir(&not_file).unwrap_or_else(|e| panic!("{e}"));
        assert!(ApiToken::load_or_create(&not_file).is_err());
    }

    #[test]
    fn compares_tokens_whole() {
        let token = ApiToken {
            value: "0123456789abcdef0123456789abcdef".into(),
        };
        let guard = Guard::new(&token, SocketAddr::from(([127, 0, 0, 1], 7180)), &[], false);
        assert!(guard.token_matches("0123456789abcdef0123456789abcdef"));
        for wrong in [
            "",
            "0123456789abcdef0123456789abcde",
            "0123456789abcdef0123456789abcdef0",
            "1123456789abcdef0123456789abcdef",
        ] {
            assert!(!guard.token_matches(wrong), "{wrong:?}");
        }
    }

    #[test]
    fn hosts_and_origins() {
        let token = ApiToken {
            value: "x".repeat(32),
        };
        let guard = Guard::new(
            &token,
            "[::1]:9000".parse().unwrap_or_else(|_| panic!()),
            &[],
            true,
        );
        for host in ["localhost", "localhost:9000", "[::1]", "[::1]:9000"] {
            assert!(guard.inner.hosts.contains(&host.to_owned()), "{host}");
        }
        assert!(!guard.inner.hosts.contains(&"127.0.0.1:9000".to_owned()));
        assert!(
            guard
                .inner
                .origins
                .contains(&"https://[::1]:9000".to_owned())
        );
        assert!(
            !guard
                .inner
                .origins
                .contains(&"http://[::1]:9000".to_owned())
        );
    }

    #[test]
    fn route_table_is_unique() {
        for (i, a) in ROUTES.iter().enumerate() {
            for b in &ROUTES[i + 1..] {
                assert!(a.method != b.method || a.path != b.path, "{a:?} twice");
            }
            assert_eq!(a.body == BodyKind::None, a.method == "GET", "{a:?}");
        }
        assert_eq!(ROUTES.iter().filter(|r| r.open).count(), 1);
    }
}
