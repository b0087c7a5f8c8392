//! Accepting connections on the broker's two listeners, with every resource bounded.
//!
//! tonic's own TLS accepts without a handshake timeout or any cap, so an idle TCP
//! connection holds a file descriptor for ever: 1,100 of them locked every agency out and
//! stopped the admin listener. Here the broker accepts TCP itself:
//!
//! - gRPC listener ([`grpc_incoming`]): each accepted socket first needs a connection
//!   slot (total cap), taken without waiting: a socket that finds none is closed at once
//!   and counted, so a flood can never pile up descriptors. At most `max_handshakes`
//!   sockets are in their TLS handshake (not yet authenticated); when all are taken, the
//!   oldest handshake is ended to make room for the new one, so a flood of idle
//!   connections cannot keep an honest agency (whose handshake takes milliseconds) out. The TLS
//!   handshake (client certificate required, checked against the CA bundle) must finish
//!   within `tls_handshake_timeout`; the authenticated stream must then send the HTTP/2
//!   preface and its first frame header within `http_header_timeout`. Streams keep TCP_NODELAY and are handed to tonic,
//!   which reads the peer certificates from them (`Request::peer_certs`).
//! - admin listener ([`serve_admin`]): plain HTTP/1 with a cap on connections, a header
//!   read timeout (which also bounds an idle keep-alive connection) and an idle timeout
//!   on the socket (a request or response that stops moving).
//!
//! Invariants: every accepted socket holds exactly one connection permit until it is
//! dropped; the permits plus [`FD_RESERVE`] never exceed the process's `nofile` limit
//! (raised to its hard limit at start, [`raise_nofile_limit`]); accept errors such as
//! EMFILE back off instead of spinning; every refusal is counted in the metrics and
//! logged: one WARN line per refusal, naming the peer and the reason, up to
//! [`WARN_BURST`] lines per kind and [`WARN_EVERY_MS`] (a flood cannot flood the log
//! too: the rest go to debug and the next WARN says how many were left out).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use lienthong_proto::tls::TlsFiles;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

use crate::error::BrokerError;
use crate::metrics::ConnectionMetrics;

/// File descriptors kept for everything but sockets: sled's files, blob and spool files,
/// the log, tokio's own. Connection caps are lowered to fit the `nofile` limit minus this.
pub(crate) const FD_RESERVE: u64 = 64;

/// How long the accept loop pauses after EMFILE/ENFILE: connections closing meanwhile
/// free descriptors; retrying at once would only spin on the same error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The window of the WARN budget for refusals (and of the one accept-error WARN).
const WARN_EVERY_MS: i64 = 10_000;

/// At most this many WARN lines per listener and kind of refusal in [`WARN_EVERY_MS`]:
/// enough that an operator sees every refused agent on a normal day, few enough that a
/// scan or a flood cannot fill the disk with log lines.
const WARN_BURST: u32 = 20;

/// Listener names, used as the `listener` label.
pub(crate) const GRPC: &str = "grpc";
pub(crate) const ADMIN: &str = "admin";

/// The caps and timeouts one listener works with, after fitting them to `nofile`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_handshakes: usize,
}

/// The soft and hard `nofile` limits after [`raise_nofile_limit`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct NofileLimit {
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: the default soft limit (often 1024)
/// is far below what a broker with many agencies needs, and only the hard limit is an
/// operator's decision (systemd `LimitNOFILE=`).
pub(crate) fn raise_nofile_limit() -> NofileLimit {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if let (Some(soft), Some(hard)) = (limit.current, limit.maximum)
        && soft < hard
    {
        match setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(hard),
                maximum: Some(hard),
            },
        ) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open file limit"),
            Err(error) => {
                tracing::warn!(soft, hard, %error, "cannot raise the open file limit");
            }
        }
    }
    let limit = getrlimit(Resource::Nofile);
    NofileLimit {
        soft: limit.current,
        hard: limit.maximum,
    }
}

/// Fits the configured caps into the descriptors the process may open: the admin
/// listener gets at most an eighth of what is left after [`FD_RESERVE`], the gRPC
/// listener the rest, and handshakes at most half of the gRPC connections, so that
/// authenticated agencies always keep room while unauthenticated sockets wait.
/// Returns (gRPC connections, gRPC handshakes, admin connections), each at least 1.
pub(crate) fn fit_caps(
    nofile: Option<u64>,
    max_connections: usize,
    max_handshakes: usize,
    max_admin_connections: usize,
) -> (usize, usize, usize) {
    let available = nofile.map_or(u64::MAX, |n| n.saturating_sub(FD_RESERVE).max(4));
    let available = usize::try_from(available).unwrap_or(usize::MAX);
    let admin = max_admin_connections.min(available / 8).max(1);
    let grpc = max_connections.min(available.saturating_sub(admin)).max(1);
    let handshakes = max_handshakes.min(grpc / 2).max(1);
    (grpc, handshakes, admin)
}

/// The client CA bundle as a root store (for the client verifier, `revocation`).
pub(crate) fn client_roots(tls: &TlsFiles) -> Result<Arc<rustls::RootCertStore>, BrokerError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&tls.ca_pem) {
        let cert = cert.map_err(|e| BrokerError::Config {
            path: "CA bundle".into(),
            detail: e.to_string(),
        })?;
        roots.add(cert).map_err(|e| BrokerError::Config {
            path: "CA bundle".into(),
            detail: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

/// The broker's TLS server configuration: its certificate chain and key as `certificate`
/// holds them (replaced by a reload), client certificates required and checked by
/// `verifier` (the CA bundle, the CRLs and the block list: see `revocation`), HTTP/2 by
/// ALPN.
pub(crate) fn tls_server_config(
    certificate: Arc<crate::reload::ServerCertificate>,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
) -> Arc<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certificate);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// Logs a WARN at most once per [`WARN_EVERY_MS`] (debug otherwise).
#[derive(Default)]
struct WarnEvery(AtomicI64);

impl WarnEvery {
    fn due(&self) -> bool {
        let now = lienthong_proto::now_ms();
        let last = self.0.load(Ordering::Relaxed);
        now.saturating_sub(last) >= WARN_EVERY_MS
            && self
                .0
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// Up to [`WARN_BURST`] WARN lines per [`WARN_EVERY_MS`]; counts the ones left out.
#[derive(Default)]
struct WarnBudget(std::sync::Mutex<BudgetWindow>);

#[derive(Default)]
struct BudgetWindow {
    start_ms: i64,
    used: u32,
    left_out: u64,
}

impl WarnBudget {
    /// `Some(n)` when this refusal may be logged at WARN, `n` being how many refusals
    /// were left out of the log (logged at debug) since the last WARN; None otherwise.
    fn take(&self) -> Option<u64> {
        let now = lienthong_proto::now_ms();
        // A panic elsewhere while holding this lock leaves only counters behind.
        let mut window = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if now.saturating_sub(window.start_ms) >= WARN_EVERY_MS {
            window.start_ms = now;
            window.used = 0;
        }
        if window.used >= WARN_BURST {
            window.left_out = window.left_out.saturating_add(1);
            return None;
        }
        window.used = window.used.saturating_add(1);
        Some(std::mem::take(&mut window.left_out))
    }
}

/// Rate-limited reporting of refusals for one listener.
#[derive(Clone)]
struct Refusals {
    listener: &'static str,
    metrics: ConnectionMetrics,
    warn_limit: Arc<WarnBudget>,
    warn_handshake: Arc<WarnBudget>,
    warn_accept: Arc<WarnEvery>,
}

impl Refusals {
    fn new(listener: &'static str, metrics: ConnectionMetrics) -> Self {
        Self {
            listener,
            metrics,
            warn_limit: Arc::default(),
            warn_handshake: Arc::default(),
            warn_accept: Arc::default(),
        }
    }

    /// A connection closed before serving it; `reason` is a fixed label value.
    fn refused(&self, reason: &'static str, peer: SocketAddr, detail: &dyn std::fmt::Display) {
        self.metrics.refused(self.listener, reason);
        let (warn, what) = match reason {
            "connection_limit" | "handshake_evicted" => (&self.warn_limit, "connection refused"),
            _ => (&self.warn_handshake, "TLS handshake refused"),
        };
        // `%` everywhere: a `&str` field would otherwise print as a quoted Rust literal.
        match warn.take() {
            Some(0) => tracing::warn!(
                listener = %self.listener,
                reason = %reason,
                %peer,
                %detail,
                "{what}"
            ),
            Some(left_out) => tracing::warn!(
                listener = %self.listener,
                reason = %reason,
                %peer,
                %detail,
                left_out,
                "{what} ({left_out} earlier refusals of this kind went to the debug level; \
                 see lienthong_broker_connections_refused_total)"
            ),
            None => tracing::debug!(
                listener = %self.listener,
                reason = %reason,
                %peer,
                %detail,
                "{what}"
            ),
        }
    }
}

/// Accepts the next connection, backing off on errors; None once `shutdown` is cancelled.
async fn accept_next(
    listener: &TcpListener,
    refusals: &Refusals,
    shutdown: &CancellationToken,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok(accepted) => return Some(accepted),
            Err(error) => {
                let errno = rustix::io::Errno::from_io_error(&error);
                let kind = match errno {
                    Some(rustix::io::Errno::MFILE) => "emfile",
                    Some(rustix::io::Errno::NFILE) => "enfile",
                    Some(rustix::io::Errno::NOBUFS | rustix::io::Errno::NOMEM) => "nomem",
                    // The peer gave up between SYN and accept: nothing to wait for.
                    Some(rustix::io::Errno::CONNABORTED | rustix::io::Errno::CONNRESET) => {
                        tracing::debug!(listener = refusals.listener, %error, "accept: connection aborted");
                        continue;
                    }
                    _ => "other",
                };
                refusals.metrics.accept_error(refusals.listener, kind);
                if refusals.warn_accept.due() {
                    tracing::warn!(
                        listener = refusals.listener,
                        kind,
                        %error,
                        "cannot accept connections (out of file descriptors or memory); \
                         backing off (see lienthong_broker_accept_errors_total)"
                    );
                }
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
}

/// Bytes a gRPC client sends first: the HTTP/2 connection preface (24 bytes) and the
/// header of its SETTINGS frame (9). hyper waits for them without a timeout of its own.
const HTTP2_PREFACE_BYTES: usize = 24 + 9;

/// A deadline on a stream: either the first `n` bytes must arrive by it, or (idle) some
/// bytes must move in either direction within `idle` of the last that did.
enum Deadline {
    None,
    FirstBytes(usize, Pin<Box<Sleep>>),
    Idle(Duration, Pin<Box<Sleep>>),
}

/// An accepted stream with its connection permit and deadline; the permit (and the
/// open-connections gauge) is released when tonic or hyper drops the stream.
pub(crate) struct Guarded<S> {
    inner: S,
    deadline: Deadline,
    _permit: OwnedSemaphorePermit,
    _open: crate::metrics::OpenConnection,
}

impl<S> Guarded<S> {
    fn timed_out(&mut self, cx: &mut Context<'_>) -> bool {
        match &mut self.deadline {
            Deadline::None => false,
            Deadline::FirstBytes(_, sleep) | Deadline::Idle(_, sleep) => {
                sleep.as_mut().poll(cx).is_ready()
            }
        }
    }

    fn progressed(&mut self, bytes: usize) {
        match &mut self.deadline {
            Deadline::None => {}
            Deadline::FirstBytes(remaining, _) => {
                *remaining = remaining.saturating_sub(bytes);
                if *remaining == 0 {
                    self.deadline = Deadline::None;
                }
            }
            Deadline::Idle(idle, sleep) => {
                let next = Instant::now() + *idle;
                sleep.as_mut().reset(next);
            }
        }
    }
}

fn timed_out_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the peer sent nothing within the timeout",
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len().saturating_sub(before);
                if read > 0 {
                    self.progressed(read);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if self.timed_out(cx) => Poll::Ready(Err(timed_out_error())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                // Only the idle deadline counts writes: a gRPC peer that never sends its
                // preface must not be kept alive by what the server writes to it.
                if n > 0 && matches!(self.deadline, Deadline::Idle(..)) {
                    self.progressed(n);
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if matches!(self.deadline, Deadline::Idle(..)) && self.timed_out(cx) => {
                Poll::Ready(Err(timed_out_error()))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                if n > 0 && matches!(self.deadline, Deadline::Idle(..)) {
                    self.progressed(n);
                }
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// tonic reads the peer's certificates (and address) from the TLS stream underneath.
impl Connected for Guarded<TlsStream<TcpStream>> {
    type ConnectInfo = TlsConnectInfo<TcpConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

pub(crate) type GrpcStream = Guarded<TlsStream<TcpStream>>;

/// The gRPC handshakes in progress, oldest first, each with the token that ends it.
#[derive(Default)]
struct InProgress {
    queue: std::sync::Mutex<std::collections::VecDeque<(u64, CancellationToken)>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl InProgress {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::VecDeque<(u64, CancellationToken)>> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn push(&self) -> (u64, CancellationToken) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        self.lock().push_back((id, token.clone()));
        (id, token)
    }

    fn remove(&self, id: u64) {
        self.lock().retain(|(other, _)| *other != id);
    }

    /// Ends the oldest handshake in progress; its task reports it and lets go of its slot.
    fn evict_oldest(&self) {
        if let Some((_, token)) = self.lock().pop_front() {
            token.cancel();
        }
    }
}

/// Accepts on `listener` and yields authenticated TLS streams for tonic's
/// `serve_with_incoming_shutdown`, until `shutdown` is cancelled.
pub(crate) fn grpc_incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: Limits,
    metrics: ConnectionMetrics,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<GrpcStream, io::Error>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(grpc_accept_loop(
        listener, tls, limits, metrics, shutdown, tx,
    ));
    ReceiverStream::new(rx)
}

async fn grpc_accept_loop(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: Limits,
    metrics: ConnectionMetrics,
    shutdown: CancellationToken,
    tx: mpsc::Sender<Result<GrpcStream, io::Error>>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes));
    let refusals = Refusals::new(GRPC, metrics.clone());
    let in_progress = Arc::new(InProgress::default());
    while let Some((tcp, peer)) = accept_next(&listener, &refusals, &shutdown).await {
        // Dropping `tcp` on refusal closes it at once: no descriptor waits for a slot.
        let Ok(connection) = connections.clone().try_acquire_owned() else {
            refusals.refused(
                "connection_limit",
                peer,
                &format_args!("{} connections open", limits.max_connections),
            );
            continue;
        };
        // All handshake slots taken: the oldest handshake gives way (an honest client
        // finishes in milliseconds, so the oldest is the likeliest to be idle), and this
        // one waits for its slot, within its own handshake timeout.
        let handshake = handshakes.clone().try_acquire_owned().ok();
        if handshake.is_none() {
            in_progress.evict_oldest();
        }
        let (id, evicted) = in_progress.push();
        // Small messages (receipts, acknowledgements) must not wait for Nagle.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, %error, "cannot set TCP_NODELAY");
        }
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        let refusals = refusals.clone();
        let stop = shutdown.clone();
        let in_handshake = metrics.handshake_started();
        let handshakes = handshakes.clone();
        let in_progress = in_progress.clone();
        tokio::spawn(async move {
            let accept = async move {
                let _slot = match handshake {
                    Some(slot) => slot,
                    None => handshakes.acquire_owned().await.map_err(io::Error::other)?,
                };
                acceptor.accept(tcp).await
            };
            let handshake_result = tokio::select! {
                () = stop.cancelled() => return,
                () = evicted.cancelled() => {
                    refusals.refused(
                        "handshake_evicted",
                        peer,
                        &format_args!(
                            "the oldest of {} TLS handshakes in progress (max_handshakes) gave way to a new connection",
                            limits.max_handshakes
                        ),
                    );
                    return;
                }
                result = tokio::time::timeout(limits.handshake_timeout, accept) => result,
            };
            in_progress.remove(id);
            drop(in_handshake);
            match handshake_result {
                Ok(Ok(stream)) => {
                    let sleep = Box::pin(tokio::time::sleep(limits.header_timeout));
                    let stream = Guarded {
                        inner: stream,
                        deadline: Deadline::FirstBytes(HTTP2_PREFACE_BYTES, sleep),
                        _permit: connection,
                        _open: refusals.metrics.connection_opened(GRPC),
                    };
                    // Err only when the server is shutting down: the stream just closes.
                    let _ = tx.send(Ok(stream)).await;
                }
                Ok(Err(error)) => refusals.refused("tls_error", peer, &error),
                Err(_) => refusals.refused(
                    "handshake_timeout",
                    peer,
                    &format_args!(
                        "no TLS handshake within {:?} (tls_handshake_timeout)",
                        limits.handshake_timeout
                    ),
                ),
            }
        });
    }
}

/// Serves `app` on the admin listener (plain HTTP/1) until `shutdown` is cancelled,
/// then lets the requests in progress finish (up to `grace`).
pub(crate) async fn serve_admin(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    metrics: ConnectionMetrics,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let refusals = Refusals::new(ADMIN, metrics.clone());
    let mut tasks = tokio::task::JoinSet::new();
    while let Some((tcp, peer)) = accept_next(&listener, &refusals, &shutdown).await {
        // Reap finished connections so the set holds only live ones.
        while tasks.try_join_next().is_some() {}
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            refusals.refused(
                "connection_limit",
                peer,
                &format_args!("{} admin connections open", limits.max_connections),
            );
            continue;
        };
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, %error, "cannot set TCP_NODELAY");
        }
        let io = Guarded {
            inner: tcp,
            deadline: Deadline::Idle(
                limits.idle_timeout,
                Box::pin(tokio::time::sleep(limits.idle_timeout)),
            ),
            _permit: permit,
            _open: metrics.connection_opened(ADMIN),
        };
        let service = TowerToHyperService::new(app.clone());
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                // Also bounds an idle keep-alive connection: hyper starts this timer
                // whenever it waits for the next request's head.
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(64 * 1024);
            let connection = builder.serve_connection(TokioIo::new(io), service);
            tokio::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = served {
                tracing::debug!(%peer, %error, "admin connection ended with an error");
            }
        });
    }
    drop(listener);
    let drained =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        // Their requests hold the shared state, and with it the store: end them.
        tracing::warn!("admin HTTP requests did not finish within the grace period");
        tasks.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::fit_caps;

    #[test]
    fn caps_fit_the_file_limit() {
        // The shipped unit's old limit: room for the reserve, admin and gRPC.
        let (grpc, handshakes, admin) = fit_caps(Some(1024), 10_000, 256, 64);
        assert_eq!((grpc, handshakes, admin), (1024 - 64 - 64, 256, 64));
        assert!(grpc + admin + 64 <= 1024);
        // A tiny limit still leaves one of each.
        assert_eq!(fit_caps(Some(10), 10_000, 256, 64), (3, 1, 1));
        // 256 (the test's ulimit): handshakes take at most half of the gRPC slots.
        assert_eq!(fit_caps(Some(256), 10_000, 256, 32), (168, 84, 24));
        // No limit: the configuration decides.
        assert_eq!(fit_caps(None, 4096, 256, 32), (4096, 256, 32));
        assert_eq!(fit_caps(Some(u64::MAX), 4096, 256, 32), (4096, 256, 32));
    }
}
