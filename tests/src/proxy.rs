//! A WAN fault proxy for tests (`tc netem` is not available): a TCP proxy between an
//! agent and the broker that adds latency, caps bandwidth, blackholes the link and cuts
//! every connection on command.
//!
//! Invariants:
//! - The settings are shared and read for every chunk, so a change applies at once to
//!   the current connections and to new ones.
//! - Bytes are forwarded in order. Memory is bounded: each direction of a connection
//!   queues at most [`QUEUE_CHUNKS`] chunks of at most [`CHUNK_BYTES`]; when the queue
//!   is full the proxy stops reading and TCP pushes back on the sender.
//! - A blackhole reads and discards everything, queued bytes included, in both
//!   directions, and keeps the connections open. A close seen while blackholed is
//!   swallowed like the bytes: it reaches the other side only after the link heals,
//!   so each peer has to notice the dead link by itself (HTTP/2 keepalive).
//! - A connection ends when a side closes (after its last bytes are forwarded), on
//!   [`FaultProxy::cut_all`] (with a TCP reset), or when the proxy is dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The largest read, and so the largest chunk queued.
pub const CHUNK_BYTES: usize = 16 * 1024;
/// Chunks queued per direction of a connection (latency line), at most.
pub const QUEUE_CHUNKS: usize = 64;
/// Under a bandwidth cap, bytes are released in slices of about this much link time.
const PACE_SLICE: Duration = Duration::from_millis(10);

/// The link conditions, the same for every connection of a proxy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkSettings {
    /// One-way delay added to every chunk, in each direction.
    pub latency: Duration,
    /// Bytes per second in each direction, shared by all connections; `None`: no cap.
    pub bandwidth: Option<u64>,
    /// Read everything, forward nothing.
    pub blackhole: bool,
}

/// Counters for assertions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Client connections accepted since start.
    pub accepted: u64,
    /// Connections open now.
    pub open: usize,
    /// Connections closed by `cut_all`.
    pub cut: u64,
    /// Bytes written to the upstream (client to server).
    pub to_upstream: u64,
    /// Bytes written to the clients (server to client).
    pub to_client: u64,
    /// Bytes read and thrown away by the blackhole, both directions.
    pub discarded: u64,
}

#[derive(Debug, Clone, Copy)]
enum Direction {
    ToUpstream = 0,
    ToClient = 1,
}

struct Shared {
    upstream: SocketAddr,
    settings: watch::Sender<LinkSettings>,
    /// Per direction, when the capped link is free again: all connections share it.
    link_free_at: [Mutex<Instant>; 2],
    /// The open connections; `accepted` changes under this lock too, so that a
    /// count read before `cut_all` covers only connections that the cut closes.
    connections: Mutex<Connections>,
    /// Cancelled when the proxy is dropped; parent of every connection's token.
    stop: CancellationToken,
    cut: AtomicU64,
    forwarded: [AtomicU64; 2],
    discarded: AtomicU64,
}

#[derive(Default)]
struct Connections {
    open: HashMap<u64, CancellationToken>,
    accepted: u64,
}

impl Shared {
    fn connections(&self) -> std::sync::MutexGuard<'_, Connections> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until `len` bytes fit through the capped link in direction `dir`.
    async fn pace(&self, dir: Direction, len: usize) {
        let Some(rate) = self.settings.borrow().bandwidth else {
            return;
        };
        let cost = Duration::from_secs_f64(len as f64 / rate.max(1) as f64);
        let done = {
            let mut free_at = self.link_free_at[dir as usize]
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let start = (*free_at).max(Instant::now());
            *free_at = start + cost;
            start + cost
        };
        tokio::time::sleep_until(done).await;
    }

    /// The largest piece written at once in the current conditions.
    fn slice_bytes(&self) -> usize {
        match self.settings.borrow().bandwidth {
            None => CHUNK_BYTES,
            Some(rate) => {
                let per_slice = rate as f64 * PACE_SLICE.as_secs_f64();
                (per_slice as usize).clamp(1, CHUNK_BYTES)
            }
        }
    }
}

/// A running proxy; dropping it closes the listener and every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0` and forwards each connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy listener");
        let addr = listener.local_addr().expect("proxy listener address");
        let now = Instant::now();
        let shared = Arc::new(Shared {
            upstream,
            settings: watch::Sender::new(LinkSettings::default()),
            link_free_at: [Mutex::new(now), Mutex::new(now)],
            connections: Mutex::new(Connections::default()),
            stop: CancellationToken::new(),
            cut: AtomicU64::new(0),
            forwarded: [AtomicU64::new(0), AtomicU64::new(0)],
            discarded: AtomicU64::new(0),
        });
        tokio::spawn(accept_loop(Arc::clone(&shared), listener));
        Self { addr, shared }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The broker URL through this proxy (the dev broker certificate names `localhost`).
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    pub fn settings(&self) -> LinkSettings {
        *self.shared.settings.borrow()
    }

    /// One-way delay added to every chunk in both directions (order is kept).
    pub fn set_latency(&self, latency: Duration) {
        self.shared.settings.send_modify(|s| s.latency = latency);
    }

    /// Caps each direction at `bytes_per_second` over all connections; `None` lifts it.
    pub fn set_bandwidth(&self, bytes_per_second: Option<u64>) {
        self.shared
            .settings
            .send_modify(|s| s.bandwidth = bytes_per_second);
    }

    /// `true`: keep accepting and reading, forward nothing, keep connections open.
    pub fn blackhole(&self, on: bool) {
        self.shared.settings.send_modify(|s| s.blackhole = on);
    }

    /// Back to a perfect link: no latency, no cap, no blackhole.
    pub fn heal(&self) {
        self.shared
            .settings
            .send_modify(|s| *s = LinkSettings::default());
    }

    /// Closes every current connection abruptly (TCP reset); new ones are still
    /// accepted. Returns how many were cut.
    pub fn cut_all(&self) -> usize {
        let cut: Vec<CancellationToken> = {
            let mut connections = self.shared.connections();
            connections.open.drain().map(|(_, token)| token).collect()
        };
        for token in &cut {
            token.cancel();
        }
        self.shared
            .cut
            .fetch_add(cut.len() as u64, Ordering::Relaxed);
        cut.len()
    }

    pub fn stats(&self) -> ProxyStats {
        let (accepted, open) = {
            let connections = self.shared.connections();
            (connections.accepted, connections.open.len())
        };
        ProxyStats {
            accepted,
            open,
            cut: self.shared.cut.load(Ordering::Relaxed),
            to_upstream: self.shared.forwarded[Direction::ToUpstream as usize]
                .load(Ordering::Relaxed),
            to_client: self.shared.forwarded[Direction::ToClient as usize].load(Ordering::Relaxed),
            discarded: self.shared.discarded.load(Ordering::Relaxed),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut next_id: u64 = 0;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shared.stop.cancelled() => return,
        };
        let client = match accepted {
            Ok((client, _)) => client,
            Err(_) => {
                // Out of descriptors or the like: back off instead of spinning.
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(10)) => continue,
                    () = shared.stop.cancelled() => return,
                }
            }
        };
        next_id += 1;
        let token = shared.stop.child_token();
        {
            let mut connections = shared.connections();
            connections.accepted += 1;
            connections.open.insert(next_id, token.clone());
        }
        tokio::spawn(connection(Arc::clone(&shared), next_id, client, token));
    }
}

async fn connection(shared: Arc<Shared>, id: u64, mut client: TcpStream, token: CancellationToken) {
    let upstream = tokio::select! {
        connected = TcpStream::connect(shared.upstream) => connected.ok(),
        () = token.cancelled() => None,
    };
    if let Some(mut upstream) = upstream {
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        {
            let (client_read, client_write) = client.split();
            let (upstream_read, upstream_write) = upstream.split();
            tokio::select! {
                () = pump(&shared, Direction::ToUpstream, client_read, upstream_write) => {}
                () = pump(&shared, Direction::ToClient, upstream_read, client_write) => {}
                () = token.cancelled() => {}
            }
        }
        if token.is_cancelled() {
            let _ = upstream.set_zero_linger();
        }
    }
    if token.is_cancelled() {
        let _ = client.set_zero_linger();
    }
    shared.connections().open.remove(&id);
}

/// Forwards one direction until `from` ends and its bytes are written, or a write
/// fails. The read side runs ahead of the write side by at most the queue.
async fn pump(shared: &Shared, dir: Direction, mut from: ReadHalf<'_>, mut to: WriteHalf<'_>) {
    let (queue, mut line) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE_CHUNKS);
    let reading = async move {
        let mut settings = shared.settings.subscribe();
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            let read = from.read(&mut buf).await;
            let (blackhole, latency) = {
                let now = settings.borrow();
                (now.blackhole, now.latency)
            };
            let n = match read {
                Ok(n) if n > 0 => n,
                // End of stream or a reset: while blackholed nobody may learn of it
                // yet; it is passed on (by returning) once the link heals.
                _ => {
                    if blackhole {
                        let _ = settings.wait_for(|s| !s.blackhole).await;
                    }
                    return;
                }
            };
            if blackhole {
                shared.discarded.fetch_add(n as u64, Ordering::Relaxed);
                continue;
            }
            let due = Instant::now() + latency;
            if queue.send((due, buf[..n].to_vec())).await.is_err() {
                return;
            }
        }
    };
    let writing = async move {
        while let Some((due, chunk)) = line.recv().await {
            tokio::time::sleep_until(due).await;
            let mut rest = chunk.as_slice();
            while !rest.is_empty() {
                let (piece, after) = rest.split_at(shared.slice_bytes().min(rest.len()));
                rest = after;
                if shared.settings.borrow().blackhole {
                    shared
                        .discarded
                        .fetch_add(piece.len() as u64, Ordering::Relaxed);
                    continue;
                }
                shared.pace(dir, piece.len()).await;
                if to.write_all(piece).await.is_err() {
                    return;
                }
                shared.forwarded[dir as usize].fetch_add(piece.len() as u64, Ordering::Relaxed);
            }
        }
        // A close is not passed on through a blackhole either.
        let _ = shared.settings.subscribe().wait_for(|s| !s.blackhole).await;
        let _ = to.shutdown().await;
    };
    tokio::join!(reading, writing);
}
