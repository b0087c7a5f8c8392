//! Document-signing keys on a PKCS#11 token (a USB token, a smart card, an HSM).
//!
//! The key is named by an RFC 7512 URI (`pkcs11:token=LABEL;object=LABEL`, optionally
//! `id=%01`, `serial=`, `?pin-source=file:/path`, `?module-path=/path`); the token's
//! module (`.so`) and a PIN file are given beside it. [`open_signing_key`] loads the
//! module, finds the token and the private key, logs in and checks the key against its
//! certificate with one signature, and returns a [`SigningKey`] that hashes locally and
//! sends only SHA-256 digests to the token (`CKM_ECDSA`, P-256).
//!
//! Invariants:
//! - One signer thread per token session: the thread owns the module handle and the
//!   session (PKCS#11 sessions are not shared between threads); callers send digests
//!   over a channel and wait for the answer, so signatures are made one at a time.
//!   Batch signatures (one per sealed group) make a token's few signatures a second
//!   enough.
//! - The PIN is read from a file only this user may read (a group- or world-readable
//!   one is refused), kept in a zeroizing secret, and never logged or printed.
//! - A signature that fails because the token went away (removed, session closed,
//!   key handle gone) is an error naming the token; the session is dropped and the
//!   next signature tries to open a new one.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use lienthong_proto::signing::DigestSigner;
use lienthong_proto::{ProtocolError, SigningKey};
use tracing::{info, warn};

/// How long a caller waits for the token's answer to one signature. A token that
/// takes longer (unplugged mid-operation, a stuck driver) fails the signature.
const SIGN_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest PIN file read (a PIN is a few characters).
const MAX_PIN_FILE_BYTES: u64 = 1024;

/// Errors of a key on a token. Every message names the token (or module) concerned
/// and none carries the PIN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("invalid PKCS#11 URI: {reason}")]
    Uri { reason: String },
    #[error("no PKCS#11 module given: use --pkcs11-module PATH (or module-path= in the URI)")]
    NoModule,
    #[error("no PIN file given: use --pin-file PATH (or pin-source=file:PATH in the URI)")]
    NoPinFile,
    #[error("cannot load the PKCS#11 module {module}: {detail}")]
    Module { module: PathBuf, detail: String },
    #[error("PIN file {path}: {detail}")]
    PinFile { path: PathBuf, detail: String },
    #[error("PIN file {path} may be read by other users (mode {mode:04o}); run chmod 600 on it")]
    PinFileReadable { path: PathBuf, mode: u32 },
    #[error("no token {wanted} in the PKCS#11 module {module} (tokens present: {present})")]
    TokenNotFound {
        wanted: String,
        module: PathBuf,
        present: String,
    },
    #[error("token {token}: wrong PIN (the PIN in {pin_file} was refused)")]
    WrongPin { token: String, pin_file: PathBuf },
    #[error("token {token}: the PIN is locked (too many wrong PINs)")]
    PinLocked { token: String },
    #[error("token {token}: no private key {object}")]
    ObjectNotFound { token: String, object: String },
    #[error("token {token}: {count} private keys match {object}; name one with id=")]
    AmbiguousObject {
        token: String,
        object: String,
        count: usize,
    },
    #[error("token {token}: the private key {object} is not an EC key")]
    NotEcKey { token: String, object: String },
    #[error("token {token} is not reachable (was it removed?): {detail}")]
    Removed { token: String, detail: String },
    #[error("token {token}: {detail}")]
    Pkcs11 { token: String, detail: String },
    #[error("token {token}: no answer within {secs} s")]
    Timeout { token: String, secs: u64 },
    #[error("token {token}: its signer thread has stopped")]
    SignerGone { token: String },
    #[error("token {token}: {source}")]
    Certificate {
        token: String,
        source: ProtocolError,
    },
}

/// An RFC 7512 PKCS#11 URI naming a private key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenUri {
    /// `token=`: the token label.
    pub token: Option<String>,
    /// `manufacturer=`, `model=`, `serial=`: narrow the token further.
    pub manufacturer: Option<String>,
    pub model: Option<String>,
    pub serial: Option<String>,
    /// `object=`: the key's label (`CKA_LABEL`).
    pub object: Option<String>,
    /// `id=`: the key's `CKA_ID` (raw bytes, percent-encoded in the URI).
    pub id: Option<Vec<u8>>,
    /// `pin-source=file:PATH` (a query attribute).
    pub pin_file: Option<PathBuf>,
    /// `module-path=PATH` (a query attribute).
    pub module: Option<PathBuf>,
}

impl TokenUri {
    /// Whether `value` is meant as a PKCS#11 URI rather than a file path.
    pub fn is_uri(value: &str) -> bool {
        value
            .get(..7)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("pkcs11:"))
    }

    /// Parses `pkcs11:` path attributes (`;`-separated) and query attributes
    /// (`&`-separated, after `?`). Unknown attributes and `pin-value` are refused.
    pub fn parse(uri: &str) -> Result<Self, TokenError> {
        let bad = |reason: String| TokenError::Uri { reason };
        if !Self::is_uri(uri) {
            return Err(bad("it must start with \"pkcs11:\"".into()));
        }
        let rest = &uri[7..];
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (path, query),
            None => (rest, ""),
        };
        let mut parsed = TokenUri::default();
        for attribute in path.split(';').filter(|a| !a.is_empty()) {
            let (name, value) = attribute
                .split_once('=')
                .ok_or_else(|| bad(format!("attribute {attribute:?} has no '='")))?;
            let bytes = percent_decode(value).map_err(bad)?;
            let text = || {
                String::from_utf8(bytes.clone())
                    .map_err(|_| bad(format!("{name}= is not UTF-8 once decoded")))
            };
            let slot = match name {
                "token" => &mut parsed.token,
                "manufacturer" => &mut parsed.manufacturer,
                "model" => &mut parsed.model,
                "serial" => &mut parsed.serial,
                "object" => &mut parsed.object,
                "id" => {
                    set_once(&mut parsed.id, bytes.clone(), name).map_err(bad)?;
                    continue;
                }
                "type" => {
                    if text()? != "private" {
                        return Err(bad("type= must be \"private\" for a signing key".into()));
                    }
                    continue;
                }
                other => {
                    return Err(bad(format!(
                        "unsupported attribute {other:?} (known: token, manufacturer, model, serial, object, id, type)"
                    )));
                }
            };
            set_once(slot, text()?, name).map_err(bad)?;
        }
        for attribute in query.split('&').filter(|a| !a.is_empty()) {
            let (name, value) = attribute
                .split_once('=')
                .ok_or_else(|| bad(format!("attribute {attribute:?} has no '='")))?;
            let value = String::from_utf8(percent_decode(value).map_err(bad)?)
                .map_err(|_| bad(format!("{name}= is not UTF-8 once decoded")))?;
            match name {
                "pin-source" => {
                    let path = value.strip_prefix("file:").ok_or_else(|| {
                        bad(
                            "pin-source= must be file:PATH (other sources are not supported)"
                                .into(),
                        )
                    })?;
                    // `file:///etc/x` and `file:/etc/x` both name /etc/x.
                    let path = path.strip_prefix("//").unwrap_or(path);
                    set_once(&mut parsed.pin_file, PathBuf::from(path), name).map_err(bad)?;
                }
                "module-path" => {
                    set_once(&mut parsed.module, PathBuf::from(value), name).map_err(bad)?;
                }
                "pin-value" => {
                    return Err(bad(
                        "pin-value= would put the PIN on the command line; put it in a PIN file"
                            .into(),
                    ));
                }
                other => {
                    return Err(bad(format!(
                        "unsupported query attribute {other:?} (known: pin-source, module-path)"
                    )));
                }
            }
        }
        if parsed.token.is_none() && parsed.serial.is_none() {
            return Err(bad("name the token with token= (or serial=)".into()));
        }
        if parsed.object.is_none() && parsed.id.is_none() {
            return Err(bad("name the key with object= or id=".into()));
        }
        Ok(parsed)
    }

    /// The token as the URI names it, for messages: `"LABEL"` or `serial "…"`.
    fn token_name(&self) -> String {
        match (&self.token, &self.serial) {
            (Some(label), _) => format!("{label:?}"),
            (None, Some(serial)) => format!("with serial {serial:?}"),
            (None, None) => "(any)".into(),
        }
    }

    /// The key as the URI names it, for messages.
    fn object_name(&self) -> String {
        match (&self.object, &self.id) {
            (Some(label), Some(id)) => format!("with label {label:?} and id {}", hex::encode(id)),
            (Some(label), None) => format!("with label {label:?}"),
            (None, Some(id)) => format!("with id {}", hex::encode(id)),
            (None, None) => "(any)".into(),
        }
    }
}

fn set_once<T>(slot: &mut Option<T>, value: T, name: &str) -> Result<(), String> {
    if slot.is_some() {
        return Err(format!("{name}= is given twice"));
    }
    *slot = Some(value);
    Ok(())
}

/// RFC 3986 percent-decoding.
fn percent_decode(value: &str) -> Result<Vec<u8>, String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex_pair = bytes
                .get(i + 1..i + 3)
                .and_then(|pair| std::str::from_utf8(pair).ok())
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in {value:?}"))?;
            out.push(hex_pair);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    Ok(out)
}

/// Where the key is and how to log in.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    pub uri: TokenUri,
    /// The PKCS#11 module (`--pkcs11-module`), e.g. /usr/lib/softhsm/libsofthsm2.so.
    pub module: PathBuf,
    /// The file holding the user PIN (`--pin-file`).
    pub pin_file: PathBuf,
}

impl TokenConfig {
    /// The URI with the module and PIN file given beside it; those given in the URI
    /// are used when the flags are absent.
    pub fn new(
        uri: &str,
        module: Option<PathBuf>,
        pin_file: Option<PathBuf>,
    ) -> Result<Self, TokenError> {
        let uri = TokenUri::parse(uri)?;
        let module = module
            .or_else(|| uri.module.clone())
            .ok_or(TokenError::NoModule)?;
        let pin_file = pin_file
            .or_else(|| uri.pin_file.clone())
            .ok_or(TokenError::NoPinFile)?;
        Ok(Self {
            uri,
            module,
            pin_file,
        })
    }
}

/// Reads the PIN: a regular file only its owner may read, first line, without the
/// line end.
fn read_pin(path: &Path) -> Result<AuthPin, TokenError> {
    let failed = |detail: String| TokenError::PinFile {
        path: path.to_owned(),
        detail,
    };
    let meta = std::fs::metadata(path).map_err(|e| failed(e.to_string()))?;
    if !meta.is_file() {
        return Err(failed("not a regular file".into()));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TokenError::PinFileReadable {
            path: path.to_owned(),
            mode,
        });
    }
    if meta.len() > MAX_PIN_FILE_BYTES {
        return Err(failed(format!(
            "{} bytes; a PIN file holds one line",
            meta.len()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| failed(e.to_string()))?;
    let pin = text.lines().next().unwrap_or_default();
    if pin.is_empty() {
        return Err(failed("empty".into()));
    }
    Ok(AuthPin::from(pin.to_owned()))
}

/// One digest to sign and where to send the answer.
struct Request {
    digest: [u8; 32],
    reply: mpsc::SyncSender<Result<Vec<u8>, TokenError>>,
}

/// A private key on a token, reached through its signer thread.
pub struct TokenSigner {
    requests: mpsc::Sender<Request>,
    /// The token and key as the URI names them, for messages.
    token: String,
    object: String,
}

impl fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSigner")
            .field("token", &self.token)
            .field("object", &self.object)
            .finish()
    }
}

impl TokenSigner {
    /// Loads the module, opens a session on the token, logs in and finds the key, on a
    /// new signer thread; returns once that worked (or with what failed).
    pub fn open(config: TokenConfig) -> Result<Self, TokenError> {
        let pin = read_pin(&config.pin_file)?;
        let token = config.uri.token_name();
        let object = config.uri.object_name();
        let (requests, queue) = mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let thread_token = token.clone();
        std::thread::Builder::new()
            .name("pkcs11-signer".into())
            .spawn(move || signer_thread(config, pin, queue, ready_tx))
            .map_err(|e| TokenError::Pkcs11 {
                token: thread_token,
                detail: format!("cannot start the signer thread: {e}"),
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                requests,
                token,
                object,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(TokenError::SignerGone { token }),
        }
    }

    /// Signs a SHA-256 digest on the token: the raw `r || s` (64 bytes).
    pub fn sign(&self, digest: &[u8; 32]) -> Result<Vec<u8>, TokenError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.requests
            .send(Request {
                digest: *digest,
                reply,
            })
            .map_err(|_| TokenError::SignerGone {
                token: self.token.clone(),
            })?;
        match answer.recv_timeout(SIGN_TIMEOUT) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(TokenError::Timeout {
                token: self.token.clone(),
                secs: SIGN_TIMEOUT.as_secs(),
            }),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(TokenError::SignerGone {
                token: self.token.clone(),
            }),
        }
    }
}

impl DigestSigner for TokenSigner {
    fn sign_digest(
        &self,
        digest: &[u8; 32],
    ) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
        self.sign(digest).map_err(Into::into)
    }

    fn describe(&self) -> String {
        format!("the key {} on token {}", self.object, self.token)
    }
}

/// Opens the key named by `config` and pairs it with its certificate chain (PEM, leaf
/// first): the [`SigningKey`] the agent signs documents and receipts with. One
/// signature is made to check that the key on the token belongs to the certificate.
pub fn open_signing_key(
    cert_chain_pem: &[u8],
    config: TokenConfig,
) -> Result<SigningKey, TokenError> {
    let token = config.uri.token_name();
    let certificate = |source| TokenError::Certificate {
        token: token.clone(),
        source,
    };
    let chain = lienthong_proto::signing::certs_from_pem(cert_chain_pem, "certificate chain")
        .map_err(certificate)?;
    let signer = Arc::new(TokenSigner::open(config)?);
    let key = SigningKey::from_digest_signer(chain, signer).map_err(certificate)?;
    info!(token = %token, "document-signing key on a PKCS#11 token");
    Ok(key)
}

/// The signer thread: owns the module and the session; answers requests until every
/// sender is gone.
fn signer_thread(
    config: TokenConfig,
    pin: AuthPin,
    queue: mpsc::Receiver<Request>,
    ready: mpsc::SyncSender<Result<(), TokenError>>,
) {
    let token = config.uri.token_name();
    let context = match load_module(&config.module) {
        Ok(context) => context,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut open = match OpenKey::open(&context, &config, &pin) {
        Ok(key) => Some(key),
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    if ready.send(Ok(())).is_err() {
        return;
    }
    let mut context = Some(context);
    for request in queue {
        let answer = sign_once(&mut context, &mut open, &config, &pin, &request.digest);
        if let Err(e) = &answer {
            warn!(token = %token, error = %e, "signing on the token failed");
        }
        let _ = request.reply.send(answer);
    }
}

/// Signs on the open session, opening one first when there is none (the module is
/// loaded again when it was finalized). After a failure the session is dropped, and
/// the module finalized: some modules (SoftHSM2 among them) keep a stale view of a
/// token that went away until they are initialised again.
fn sign_once(
    context: &mut Option<Pkcs11>,
    open: &mut Option<OpenKey>,
    config: &TokenConfig,
    pin: &AuthPin,
    digest: &[u8; 32],
) -> Result<Vec<u8>, TokenError> {
    let result = match open {
        Some(key) => key.sign(digest),
        None => {
            let loaded = match context.take() {
                Some(loaded) => loaded,
                None => load_module(&config.module)?,
            };
            let opened = OpenKey::open(&loaded, config, pin);
            *context = Some(loaded);
            opened.and_then(|key| {
                let signed = key.sign(digest);
                *open = Some(key);
                signed
            })
        }
    };
    if result.is_err() {
        // The session goes first: it holds the module.
        *open = None;
        if let Some(loaded) = context.take()
            && let Err(e) = loaded.finalize()
        {
            warn!(token = %config.uri.token_name(), error = %describe(&e), "cannot finalize the PKCS#11 module");
        }
    }
    result
}

/// Loads and initialises the module. A module already initialised in this process
/// (another signer) is used as it is.
fn load_module(module: &Path) -> Result<Pkcs11, TokenError> {
    let failed = |detail: String| TokenError::Module {
        module: module.to_owned(),
        detail,
    };
    let context = Pkcs11::new(module).map_err(|e| failed(e.to_string()))?;
    match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(context),
        Err(e) => Err(failed(describe(&e))),
    }
}

/// A logged-in session and the private key's handle.
struct OpenKey {
    session: Session,
    key: ObjectHandle,
    token: String,
}

impl OpenKey {
    fn open(context: &Pkcs11, config: &TokenConfig, pin: &AuthPin) -> Result<Self, TokenError> {
        let uri = &config.uri;
        let token = uri.token_name();
        let pkcs11 = |e: CkError| TokenError::Pkcs11 {
            token: token.clone(),
            detail: describe(&e),
        };
        let slot = find_slot(context, config)?;
        let session = context.open_ro_session(slot).map_err(pkcs11)?;
        match session.login(UserType::User, Some(pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
                return Err(TokenError::WrongPin {
                    token,
                    pin_file: config.pin_file.clone(),
                });
            }
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => {
                return Err(TokenError::PinLocked { token });
            }
            Err(e) => return Err(pkcs11(e)),
        }
        let mut template = vec![Attribute::Class(ObjectClass::PRIVATE_KEY)];
        if let Some(label) = &uri.object {
            template.push(Attribute::Label(label.as_bytes().to_vec()));
        }
        if let Some(id) = &uri.id {
            template.push(Attribute::Id(id.clone()));
        }
        let found = session.find_objects(&template).map_err(pkcs11)?;
        let key = match found.as_slice() {
            [key] => *key,
            [] => {
                return Err(TokenError::ObjectNotFound {
                    token,
                    object: uri.object_name(),
                });
            }
            many => {
                return Err(TokenError::AmbiguousObject {
                    token,
                    object: uri.object_name(),
                    count: many.len(),
                });
            }
        };
        let is_ec = session
            .get_attributes(key, &[AttributeType::KeyType])
            .map_err(pkcs11)?
            .iter()
            .any(|a| matches!(a, Attribute::KeyType(t) if *t == KeyType::EC));
        if !is_ec {
            return Err(TokenError::NotEcKey {
                token,
                object: uri.object_name(),
            });
        }
        Ok(Self {
            session,
            key,
            token,
        })
    }

    fn sign(&self, digest: &[u8; 32]) -> Result<Vec<u8>, TokenError> {
        self.session
            .sign(&Mechanism::Ecdsa, self.key, digest)
            .map_err(|e| {
                let detail = describe(&e);
                match e {
                    CkError::Pkcs11(rv, _) if token_gone(rv) => TokenError::Removed {
                        token: self.token.clone(),
                        detail,
                    },
                    _ => TokenError::Pkcs11 {
                        token: self.token.clone(),
                        detail,
                    },
                }
            })
    }
}

/// The slot whose token matches the URI's token attributes.
fn find_slot(context: &Pkcs11, config: &TokenConfig) -> Result<Slot, TokenError> {
    let uri = &config.uri;
    let module_error = |e: CkError| TokenError::Module {
        module: config.module.clone(),
        detail: describe(&e),
    };
    let mut present = Vec::new();
    for slot in context.get_slots_with_token().map_err(module_error)? {
        // A slot whose token cannot be read (removed meanwhile) is not a match.
        let Ok(info) = context.get_token_info(slot) else {
            continue;
        };
        let matches = |wanted: &Option<String>, actual: &str| {
            wanted.as_deref().is_none_or(|w| w == actual.trim_end())
        };
        if matches(&uri.token, info.label())
            && matches(&uri.manufacturer, info.manufacturer_id())
            && matches(&uri.model, info.model())
            && matches(&uri.serial, info.serial_number())
        {
            return Ok(slot);
        }
        if info.token_initialized() {
            present.push(format!("{:?}", info.label().trim_end()));
        }
    }
    Err(TokenError::TokenNotFound {
        wanted: uri.token_name(),
        module: config.module.clone(),
        present: if present.is_empty() {
            "none".into()
        } else {
            present.join(", ")
        },
    })
}

/// Return values that mean the token (or the session on it) is gone.
fn token_gone(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::DeviceRemoved
            | RvError::DeviceError
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::SessionClosed
            | RvError::SessionHandleInvalid
            | RvError::KeyHandleInvalid
            | RvError::ObjectHandleInvalid
            | RvError::UserNotLoggedIn
    )
}

/// A PKCS#11 error in a few words: the function and the return value's name.
fn describe(error: &CkError) -> String {
    match error {
        CkError::Pkcs11(rv, function) => format!("{function:?} returned {rv:?}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn uris_parse_with_percent_encoding_and_query_attributes() {
        let uri = TokenUri::parse(
            "pkcs11:token=V%C4%83n%20th%C6%B0;object=seal;id=%01%A2?pin-source=file:/etc/pin&module-path=/usr/lib/x.so",
        )
        .unwrap();
        assert_eq!(uri.token.as_deref(), Some("Văn thư"));
        assert_eq!(uri.object.as_deref(), Some("seal"));
        assert_eq!(uri.id, Some(vec![0x01, 0xa2]));
        assert_eq!(uri.pin_file, Some(PathBuf::from("/etc/pin")));
        assert_eq!(uri.module, Some(PathBuf::from("/usr/lib/x.so")));
        let uri = TokenUri::parse("pkcs11:token=t;id=%ff;type=private").unwrap();
        assert_eq!(uri.id, Some(vec![0xff]));
        assert_eq!(
            TokenUri::parse("pkcs11:serial=123;object=k?pin-source=file:///p")
                .unwrap()
                .pin_file,
            Some(PathBuf::from("/p"))
        );
    }

    #[test]
    fn bad_uris_are_refused_with_the_reason() {
        let reason = |uri: &str| match TokenUri::parse(uri) {
            Err(TokenError::Uri { reason }) => reason,
            other => panic!("{uri}: {other:?}"),
        };
        assert!(reason("/etc/key.pem").contains("pkcs11:"));
        assert!(reason("pkcs11:object=k").contains("token="));
        assert!(reason("pkcs11:token=t").contains("object="));
        assert!(reason("pkcs11:token=t;object=k;object=j").contains("twice"));
        assert!(reason("pkcs11:token=t;object=%4").contains("percent"));
        assert!(reason("pkcs11:token=t;object=k;slot=1").contains("slot"));
        assert!(reason("pkcs11:token=t;object=k;type=public").contains("private"));
        assert!(reason("pkcs11:token=t;object=k?pin-value=1234").contains("PIN file"));
        assert!(reason("pkcs11:token=t;object=k?pin-source=env:PIN").contains("file:"));
    }

    #[test]
    fn flags_win_over_the_uri_and_one_of_each_is_needed() {
        let config = TokenConfig::new(
            "pkcs11:token=t;object=k?module-path=/a.so&pin-source=file:/pin",
            Some("/b.so".into()),
            None,
        )
        .unwrap();
        assert_eq!(config.module, PathBuf::from("/b.so"));
        assert_eq!(config.pin_file, PathBuf::from("/pin"));
        assert_eq!(
            TokenConfig::new("pkcs11:token=t;object=k", None, Some("/pin".into())).unwrap_err(),
            TokenError::NoModule
        );
        assert_eq!(
            TokenConfig::new("pkcs11:token=t;object=k", Some("/a.so".into()), None).unwrap_err(),
            TokenError::NoPinFile
        );
    }

    #[test]
    fn a_pin_file_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::write(&path, "1234\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(
            read_pin(&path).unwrap_err(),
            TokenError::PinFileReadable {
                path: path.clone(),
                mode: 0o640
            }
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_pin(&path).is_ok());
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(read_pin(&path), Err(TokenError::PinFile { .. })));
    }

    #[test]
    fn a_module_that_does_not_load_is_named() {
        let err = load_module(Path::new("/nonexistent/libpkcs11.so")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot load the PKCS#11 module /nonexistent/libpkcs11.so: "),
            "{err}"
        );
    }
}
