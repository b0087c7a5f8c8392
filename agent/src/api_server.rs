//! The local API's listener: an accept loop of our own around hyper's HTTP/1.1
//! server, because `axum::serve` cannot bound what a client may hold.
//!
//! Owns the connection limits:
//! - at most `max_connections` connections are open; at the cap the connection that
//!   moved a byte least recently is asked to close (it finishes the request it is
//!   serving, if any, and an idle kept-alive one closes at once) and the newcomer,
//!   accepted, waits until it has (no other connection is accepted meanwhile). Least recently active rather than oldest:
//!   HTTP pools reuse their most recently used connection first, so the one idle the
//!   longest is the one a client is least likely to be writing a request to as it
//!   closes (a request caught by such a close fails on the client's side; clients
//!   retry with an `Idempotency-Key`). Without this, a gateway whose HTTP pool had grown past the
//!   cap saw part of its requests wait, unanswered, until some kept-alive connection
//!   timed out: the bench's driver, with 256 requests in flight, held 275–338
//!   connections to the API's 256 and ran at a quarter of its speed;
//! - a request's headers must arrive within `header_timeout` (hyper's
//!   `header_read_timeout`, which also runs while a kept-alive connection waits for its
//!   next request, so it bounds idle keep-alive too);
//! - a connection on which no byte moved in either direction for `idle_timeout` (a
//!   stalled upload, a client that stopped reading) is closed: its socket fails, so
//!   a handler reading the body sees an error and removes what it wrote;
//! - with TLS, the handshake must finish within `tls_handshake_timeout`.
//!
//! On shutdown every connection is asked to finish its current request and close;
//! connections still open after [`DRAIN`] are dropped.
//!
//! Also owns the off-loopback rule ([`check_bind`]): a non-loopback address needs TLS
//! or an explicit `insecure` choice, which is logged as a warning at every start.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How long open connections get to finish after shutdown was asked.
pub const DRAIN: Duration = Duration::from_secs(10);

/// The listener's limits.
#[derive(Clone)]
pub(crate) struct ServeOptions {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub max_connections: usize,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Why the API may not listen where it was asked to.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(
        "the API address {0} is not loopback: serve it over HTTPS (--api-tls-cert FILE \
         --api-tls-key FILE) or say that it may run without TLS (--api-insecure-bind)"
    )]
    NeedsTls(SocketAddr),
}

/// Refuses a non-loopback API address without TLS unless `insecure`; warns (at every
/// start) when it is allowed without TLS.
pub fn check_bind(addr: SocketAddr, tls: bool, insecure: bool) -> Result<(), BindError> {
    if addr.ip().is_loopback() || tls {
        return Ok(());
    }
    if !insecure {
        return Err(BindError::NeedsTls(addr));
    }
    warn!(
        api = %addr,
        "the local API is exposed off loopback WITHOUT TLS (--api-insecure-bind): the token \
         and every document travel in clear text on the network"
    );
    Ok(())
}

/// A rustls server configuration for the API from a PEM chain and PKCS#8/SEC1/PKCS#1
/// key; HTTP/1.1 only.
pub fn tls_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<rustls::ServerConfig, String> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("API TLS certificate: {e}"))?;
    if certs.is_empty() {
        return Err("API TLS certificate: no certificate in the PEM file".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("API TLS key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("API TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("API TLS certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves `app` on `listener` until `shutdown` is cancelled.
pub(crate) async fn serve(
    listener: TcpListener,
    app: axum::Router,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let mut connections = tokio::task::JoinSet::new();
    // Open connections, oldest first; a token is cancelled once its connection ended
    // (its task's drop guard) or was asked to close.
    let mut open: Vec<(CancellationToken, Activity)> = Vec::new();
    loop {
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
        open.retain(|(token, _)| !token.is_cancelled());
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors or a connection reset before accept: keep
                // serving, after a pause so that a persistent error does not spin.
                warn!(error = %e, "the API cannot accept a connection");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        // At the cap, and only when a newcomer is here: the least recently active
        // connection is asked to close, and the newcomer waits for its slot.
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if let Some(quietest) = open
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, (_, clock))| clock.last_activity())
                    .map(|(at, _)| at)
                {
                    debug!(
                        "API connection cap reached; asking the least recently active connection to close"
                    );
                    let (token, _) = open.swap_remove(quietest);
                    token.cancel();
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    permit = Arc::clone(&permits).acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                }
            }
        };
        // Answers are small and latency matters: no Nagle delay.
        let _ = tcp.set_nodelay(true);
        let stop = shutdown.child_token();
        let clock = Activity::new();
        open.push((stop.clone(), clock.clone()));
        let (app, options) = (app.clone(), options.clone());
        connections.spawn(async move {
            let ended = stop.clone().drop_guard();
            connection(tcp, peer, app, options, clock, stop).await;
            drop(ended);
            drop(permit);
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            open = connections.len(),
            "API connections still open after the drain time; closing them"
        );
        connections.shutdown().await;
    }
    Ok(())
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    app: axum::Router,
    options: ServeOptions,
    clock: Activity,
    shutdown: CancellationToken,
) {
    let io = Watched {
        inner: tcp,
        clock: clock.clone(),
    };
    match &options.tls {
        None => http(io, app, &options, clock, shutdown).await,
        Some(acceptor) => {
            let handshake =
                tokio::time::timeout(options.tls_handshake_timeout, acceptor.accept(io)).await;
            match handshake {
                Ok(Ok(tls)) => http(tls, app, &options, clock, shutdown).await,
                Ok(Err(e)) => debug!(peer = %peer, error = %e, "API TLS handshake failed"),
                Err(_) => debug!(peer = %peer, "API TLS handshake timed out"),
            }
        }
    }
}

async fn http<I>(
    io: I,
    app: axum::Router,
    options: &ServeOptions,
    clock: Activity,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    debug!(error = %e, "API connection ended with an error");
                }
                return;
            }
            _ = shutdown.cancelled(), if !closing => {
                // Finish the request in flight, then close.
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = clock.idle_for(options.idle_timeout), if !clock.is_expired() => {
                // Fail the socket rather than drop the connection: a handler reading a
                // stalled body gets an error and cleans up (a dropped one could not).
                debug!("closing an API connection idle past the limit");
                clock.expire();
            }
            _ = tokio::time::sleep(options.idle_timeout), if clock.is_expired() => {
                // The handler did not finish after its socket failed: drop it.
                return;
            }
        }
    }
}

/// When a connection last moved a byte, in milliseconds since it opened; and whether
/// it was declared idle past the limit (then its socket fails every read and write).
#[derive(Clone)]
struct Activity {
    opened: Instant,
    last_ms: Arc<AtomicU64>,
    expired: Arc<AtomicBool>,
    /// The connection task, woken when the socket is failed.
    waker: Arc<AtomicWaker>,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
            expired: Arc::new(AtomicBool::new(false)),
            waker: Arc::new(AtomicWaker::new()),
        }
    }

    fn expire(&self) {
        self.expired.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn is_expired(&self) -> bool {
        self.expired.load(Ordering::Acquire)
    }

    /// Registers the polling task; an error once the connection was declared idle.
    fn check(&self, cx: &Context<'_>) -> Result<(), std::io::Error> {
        self.waker.register(cx.waker());
        if self.is_expired() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no byte moved on the connection within the idle timeout",
            ));
        }
        Ok(())
    }

    /// When the connection last moved a byte (or opened).
    fn last_activity(&self) -> Instant {
        self.opened
            .checked_add(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
            .unwrap_or(self.opened)
    }

    fn touch(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once no byte moved for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let last = self.last_ms.load(Ordering::Relaxed);
            let deadline = self
                .opened
                .checked_add(Duration::from_millis(last))
                .and_then(|t| t.checked_add(limit));
            let Some(deadline) = deadline else {
                return std::future::pending().await;
            };
            tokio::time::sleep_until(deadline).await;
            if self.last_ms.load(Ordering::Relaxed) == last {
                return;
            }
        }
    }
}

/// A TCP stream that records when it last moved a byte.
struct Watched {
    inner: TcpStream,
    clock: Activity,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Err(e) = self.clock.check(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.touch();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Err(e) = self.clock.check(cx) {
            return Poll::Ready(Err(e));
        }
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if let Err(e) = self.clock.check(cx) {
            return Poll::Ready(Err(e));
        }
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_loopback_needs_tls_or_the_insecure_flag() {
        let public: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 7180));
        let err = check_bind(public, false, false).unwrap_err();
        assert!(err.to_string().contains("--api-tls-cert"), "{err}");
        assert!(check_bind(public, true, false).is_ok());
        assert!(check_bind(public, false, true).is_ok());
        for local in ["127.0.0.1:7180", "[::1]:7180", "127.0.0.2:1"] {
            let addr: SocketAddr = local.parse().unwrap_or_else(|_| panic!("{local}"));
            assert!(check_bind(addr, false, false).is_ok(), "{local}");
        }
    }
}
