//! The gRPC channel to the broker and the retry policy.
//!
//! One lazily connected channel (mutual TLS, HTTP/2 keepalive) is shared by the outbox
//! submitter, the session and status queries; tonic reconnects it on the next call
//! after a failure. Invariant: the TLS server name is the host of the broker URL.

use std::time::Duration;

use lienthong_proto::pb::exchange_client::ExchangeClient;
use rand::Rng;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::{AgentConfig, AgentError};

/// Builds the broker client; connects on first use.
pub fn client(config: &AgentConfig) -> Result<ExchangeClient<Channel>, AgentError> {
    let url = &config.broker_url;
    let bad_url = |detail: String| AgentError::Config(format!("broker URL {url:?}: {detail}"));
    let endpoint = Endpoint::from_shared(url.clone()).map_err(|e| bad_url(e.to_string()))?;
    if endpoint.uri().scheme_str() != Some("https") {
        return Err(bad_url("expected https://HOST:PORT".into()));
    }
    let host = endpoint
        .uri()
        .host()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
        .ok_or_else(|| bad_url("no host".into()))?;
    let channel = endpoint
        .tls_config(
            config
                .tls
                .client_config(&host)
                .timeout(Duration::from_secs(5)),
        )
        .map_err(|e| bad_url(format!("TLS configuration: {e}")))?
        .http2_keep_alive_interval(config.keepalive_interval)
        .keep_alive_timeout(config.keepalive_timeout)
        .keep_alive_while_idle(true)
        // Large windows for WAN links (see the broker's), grown from h2's BDP estimate.
        .initial_stream_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(8 * 1024 * 1024)
        .http2_adaptive_window(true)
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    Ok(ExchangeClient::new(channel)
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes))
}

/// A random delay for the `failures`-th consecutive failure (1-based): full jitter over
/// `min * 2^(failures-1)`, capped at `max`.
pub fn backoff(failures: u32, min: Duration, max: Duration) -> Duration {
    let exponent = failures.saturating_sub(1).min(20);
    let ceiling = min.saturating_mul(1u32 << exponent).min(max);
    let ceiling_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=ceiling_ms))
}

/// The broker marks a refusal that no retry can change (e.g. a document over its size
/// limit, RESOURCE_EXHAUSTED like a full queue, which is temporary) with this metadata.
pub const PERMANENT_METADATA: &str = "lienthong-permanent";

/// True when resubmitting the same document cannot succeed.
pub fn is_permanent_status(status: &tonic::Status) -> bool {
    is_permanent(status.code()) || status.metadata().get(PERMANENT_METADATA).is_some()
}

/// Codes after which resubmitting the same document cannot succeed.
pub fn is_permanent(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::PermissionDenied
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unauthenticated
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let min = Duration::from_millis(200);
        let max = Duration::from_secs(30);
        for _ in 0..100 {
            assert!(backoff(1, min, max) <= min);
            assert!(backoff(3, min, max) <= min * 4);
            assert!(backoff(50, min, max) <= max);
        }
    }

    #[test]
    fn permanent_codes() {
        assert!(is_permanent(Code::InvalidArgument));
        assert!(is_permanent(Code::Unauthenticated));
        assert!(!is_permanent(Code::Unavailable));
        assert!(!is_permanent(Code::ResourceExhausted));
        assert!(!is_permanent(Code::Unknown));
    }
}
