//! Reloading the agent's keys while it runs (`SIGHUP` in the CLI): its TLS certificate
//! and key (the identity it shows the broker) and the key it seals documents and signs
//! receipts with.
//!
//! Invariants:
//! - A reload is all or nothing: the new TLS files and seal key are read and checked
//!   (the key is the certificate's; both certificates name this agency) before anything
//!   is swapped; a refused reload logs why, counts it, and leaves the keys in force.
//! - Nothing in progress is dropped: the open session and calls keep the connection
//!   they have; calls made after the swap connect with the new certificate (to the
//!   broker URL configured now), and documents sealed after it carry the new key's
//!   signature.
//! - The agency cannot change; the data and inbox folders, the CA bundle and the API
//!   settings take effect at the next restart.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use lienthong_proto::{PeerIdentity, SigningKey};

use crate::{Agent, AgentConfig, AgentError};

/// What a reload reads: the configuration as at start, and whether to keep the seal key
/// in force instead of `config.signing_key` (a key on a token that is already open: a
/// PKCS#11 module is initialised once per process).
pub struct Reloaded {
    pub config: AgentConfig,
    pub keep_signing_key: bool,
}

/// Reads the configuration again (the flags' files and the `--config` file).
pub type ReloadLoad =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<Reloaded, String>> + Send>> + Send + Sync>;

/// Where reload requests come from and how the configuration is read again.
#[derive(Clone)]
pub struct ReloadHook {
    /// Notified once per request (`notify_one`: a request made while a reload runs is
    /// kept and served after it).
    pub requests: Arc<tokio::sync::Notify>,
    pub load: ReloadLoad,
}

/// The seal key of `config` (its own, or the TLS pair's), refused unless its
/// certificate names `agency`.
pub(crate) fn signing_key_for(config: &AgentConfig) -> Result<Arc<SigningKey>, AgentError> {
    let key = match &config.signing_key {
        Some(key) => Arc::clone(key),
        None => Arc::new(config.tls.signing_key().map_err(|source| AgentError::Key {
            what: "TLS certificate and key",
            source,
        })?),
    };
    check_names_agency(&key, config)?;
    Ok(key)
}

fn check_names_agency(key: &SigningKey, config: &AgentConfig) -> Result<(), AgentError> {
    match key.identity() {
        Ok(PeerIdentity::Agency(code)) if code == config.agency => Ok(()),
        Ok(other) => Err(AgentError::Config(format!(
            "the signing certificate is for {other}, not agency {}",
            config.agency
        ))),
        Err(source) => Err(AgentError::Key {
            what: "signing certificate",
            source,
        }),
    }
}

/// Serves reload requests until `stop`.
pub(crate) async fn reload_loop(
    agent: Arc<Agent>,
    hook: ReloadHook,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = hook.requests.notified() => {}
        }
        let result = match (hook.load)().await {
            Ok(reloaded) => apply(&agent, reloaded),
            Err(detail) => Err(AgentError::Config(detail)),
        };
        match result {
            Ok(()) => {
                agent.metrics.reload(true);
                tracing::info!("keys reloaded; other settings take effect at the next restart");
            }
            Err(error) => {
                agent.metrics.reload(false);
                tracing::error!(%error, "reload refused; the keys in force are unchanged");
            }
        }
    }
}

/// Checks the new keys whole, then swaps them.
fn apply(agent: &Agent, reloaded: Reloaded) -> Result<(), AgentError> {
    let Reloaded {
        config,
        keep_signing_key,
    } = reloaded;
    if config.agency != agent.agency {
        return Err(AgentError::Config(format!(
            "the configuration is now for agency {}, not {}: that takes a restart",
            config.agency, agent.agency
        )));
    }
    // The TLS pair must name this agency too: the broker would refuse it otherwise.
    let tls_key = config.tls.signing_key().map_err(|source| AgentError::Key {
        what: "TLS certificate and key",
        source,
    })?;
    check_names_agency(&tls_key, &config)?;
    let signing_key = if keep_signing_key {
        agent.signing_key()
    } else {
        signing_key_for(&config)?
    };
    let client = crate::broker_client::client(&config)?;
    let held = crate::held_certificates(&config.tls, &signing_key);
    agent.set_client(client);
    agent.set_signing_key(signing_key);
    agent.metrics.set_certificates(held);
    Ok(())
}
