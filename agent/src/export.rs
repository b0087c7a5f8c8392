//! The inbox folder: one complete folder per received document.
//!
//! Layout (DESIGN.md sections 5 and 7): `<inbox_dir>/<message-id>/` holds every
//! attachment under its own name, `envelope.pb` (the signed envelope exactly as
//! received), `submission-receipt.pb` (the broker's signed proof of submission, whose
//! time is the document's trusted time), `delivery-receipt.pb` (this agency's signed
//! proof of delivery) and `document.json` (the decoded header, for people and
//! scripts). `lienthong verify` checks the three signatures offline.
//!
//! Access: folders are 0700 and files 0600, owned by the agent's user; with a gateway
//! group configured ([`InboxAccess`]) folders are 0750 and files 0640 with that group.
//! Modes are set explicitly, not left to the umask, so that another local user never
//! reads a document whatever the process was started with.
//!
//! Invariants:
//! - A folder named after a message id is always complete: it is written as
//!   `<inbox_dir>/.partial-<id>/`, every file and the folder are fsynced, and only then
//!   is it renamed into place (and the inbox folder fsynced).
//! - Each document appears exactly once: an existing complete folder is never
//!   rewritten.
//! - Attachment names were checked by `verify_document` (plain, safe file names that
//!   cannot collide with the fixed names, `RESERVED_FILE_NAMES`).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use lienthong_proto::pb::{BusinessType, DocumentHeader};

/// Prefix of folders still being written.
pub const PARTIAL_PREFIX: &str = ".partial-";

/// File names of the two receipts in an export folder.
pub const SUBMISSION_RECEIPT_FILE: &str = "submission-receipt.pb";
pub const DELIVERY_RECEIPT_FILE: &str = "delivery-receipt.pb";

/// Who may read the inbox folder besides the agent's own user: nobody, or the members
/// of one gateway group (a numeric group id, resolved from its name by the caller).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InboxAccess {
    pub group: Option<u32>,
}

impl InboxAccess {
    pub fn dir_mode(self) -> u32 {
        if self.group.is_some() { 0o750 } else { 0o700 }
    }

    pub fn file_mode(self) -> u32 {
        if self.group.is_some() { 0o640 } else { 0o600 }
    }

    /// Gives `path` (a folder or file this agent created) its mode and group. The
    /// mode is set after creation because the umask may have removed the group bits
    /// the gateway group needs.
    pub fn apply(self, path: &Path, is_dir: bool) -> Result<(), ExportError> {
        if let Some(gid) = self.group {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(io_at(path))?;
        }
        let mode = if is_dir {
            self.dir_mode()
        } else {
            self.file_mode()
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_at(path))
    }

    /// Creates `path` (and missing parents) and gives the last folder its mode and
    /// group; an existing folder gets them too.
    pub fn create_dir(self, path: &Path) -> Result<(), ExportError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(self.dir_mode())
            .create(path)
            .map_err(io_at(path))?;
        self.apply(path, true)
    }
}

/// RFC 3339 text for Unix milliseconds (UTC).
pub use lienthong_proto::rfc3339_ms;

fn business_type_name(value: i32) -> &'static str {
    match BusinessType::try_from(value) {
        Ok(BusinessType::New) => "new",
        Ok(BusinessType::Recall) => "recall",
        Ok(BusinessType::Update) => "update",
        Ok(BusinessType::Replace) => "replace",
        Err(_) => "unknown",
    }
}

/// A header's fields as people and scripts read them: `document.json` and
/// `lienthong edxml check` both print this. Empty optional texts are `null`.
pub fn header_json(header: &DocumentHeader) -> serde_json::Map<String, serde_json::Value> {
    let signer = header.signer.as_ref().map(|s| {
        serde_json::json!({
            "competence": s.competence,
            "position": s.position,
            "full_name": s.full_name,
        })
    });
    let attachments: Vec<serde_json::Value> = header
        .attachments
        .iter()
        .map(|a| {
            serde_json::json!({
                "name": a.name,
                "media_type": a.media_type,
                "size": a.size,
                "sha256": hex::encode(&a.sha256),
            })
        })
        .collect();
    let optional = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let value = serde_json::json!({
        "business_id": header.business_id,
        "sender": header.sender,
        "sender_name": optional(&header.sender_name),
        "recipients": header.recipients,
        "number": header.number,
        "notation": header.notation,
        "document_type": optional(&header.document_type),
        "document_type_name": optional(&header.document_type_name),
        "subject": header.subject,
        "content": optional(&header.content),
        "issue_place": optional(&header.issue_place),
        "issue_date": header.issue_date,
        "signer": signer,
        "priority": header.priority,
        "steering_type": header.steering_type,
        "due_date": optional(&header.due_date),
        "business_type": business_type_name(header.business_type),
        "business_reason": optional(&header.business_reason),
        "refers_to_business_id": optional(&header.refers_to_business_id),
        "to_places": header.to_places,
        "attachments": attachments,
    });
    match value {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    }
}

/// The `document.json` value: the decoded header, for people and scripts.
pub fn document_json(
    header: &DocumentHeader,
    header_sha256: &[u8],
    received_at_ms: i64,
) -> serde_json::Value {
    let mut map = header_json(header);
    let optional = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let extra = serde_json::json!({
        "message_id": header.message_id,
        "refers_to": optional(&header.refers_to),
        "created_at": rfc3339_ms(header.created_at_ms),
        "expires_at": if header.expires_at_ms == 0 { None } else { rfc3339_ms(header.expires_at_ms) },
        "header_sha256": hex::encode(header_sha256),
        "received_at": rfc3339_ms(received_at_ms),
    });
    if let serde_json::Value::Object(extra) = extra {
        map.extend(extra);
    }
    serde_json::Value::Object(map)
}

/// Everything written into one export folder.
pub struct ExportDocument<'a> {
    pub message_id: &'a str,
    /// The envelope exactly as received (prost-encoded `Signed`).
    pub envelope: &'a [u8],
    /// Decoded from the verified envelope.
    pub header: &'a DocumentHeader,
    pub header_sha256: &'a [u8],
    pub received_at_ms: i64,
    /// In header order.
    pub attachments: &'a [Bytes],
    /// Instead of `attachments`: a folder holding them as files `<index>` (checked and
    /// synced), which are moved into the export.
    pub attachment_files: Option<&'a Path>,
    /// The broker's signed submission receipt and this agency's signed delivery
    /// receipt (prost-encoded `Signed`), written next to the envelope when present.
    pub submission_receipt: Option<&'a [u8]>,
    pub delivery_receipt: Option<&'a [u8]>,
}

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> ExportError + '_ {
    move |source| ExportError {
        path: path.to_owned(),
        source,
    }
}

/// A file or folder of the inbox that could not be written.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct ExportError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// The folder of message `id` in `inbox_dir`.
pub fn folder(inbox_dir: &Path, id: &str) -> PathBuf {
    inbox_dir.join(id)
}

/// True when the document's complete folder exists.
pub fn is_exported(inbox_dir: &Path, id: &str) -> bool {
    folder(inbox_dir, id).is_dir()
}

/// Creates and writes a file private to the agent (and the gateway group, if any);
/// the caller makes it durable (see [`GroupSync`]).
fn write_new(path: &Path, bytes: &[u8], access: InboxAccess) -> Result<(), ExportError> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(access.file_mode())
        .open(path)
        .map_err(io_at(path))?;
    file.write_all(bytes).map_err(io_at(path))?;
    drop(file);
    access.apply(path, false)
}

/// Group sync of the inbox's filesystem: concurrent exports write their files, then
/// share one `syncfs` instead of one `fsync` per file and folder. A caller returns once
/// a sync that started after its call has completed, so everything it wrote before
/// calling is on disk.
#[derive(Debug)]
pub struct GroupSync {
    dir: PathBuf,
    handle: std::fs::File,
    state: std::sync::Mutex<SyncTickets>,
    done: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct SyncTickets {
    next: u64,
    /// Every ticket below this is covered by a completed sync.
    covered: u64,
    syncing: bool,
}

impl GroupSync {
    /// For the filesystem holding `dir`.
    pub fn new(dir: &Path) -> Result<Self, ExportError> {
        Ok(Self {
            dir: dir.to_owned(),
            handle: std::fs::File::open(dir).map_err(io_at(dir))?,
            state: std::sync::Mutex::default(),
            done: std::sync::Condvar::new(),
        })
    }

    /// Blocks until what the caller wrote before calling is durable.
    pub fn sync(&self) -> Result<(), ExportError> {
        let lock = || {
            self.state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        let mut state = lock();
        let ticket = state.next;
        state.next += 1;
        loop {
            if state.covered > ticket {
                return Ok(());
            }
            if state.syncing {
                state = self
                    .done
                    .wait(state)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                continue;
            }
            state.syncing = true;
            let covers = state.next;
            drop(state);
            let synced = rustix::fs::syncfs(&self.handle).map_err(|e| ExportError {
                path: self.dir.clone(),
                source: std::io::Error::from(e),
            });
            state = lock();
            state.syncing = false;
            if synced.is_ok() {
                state.covered = state.covered.max(covers);
            }
            self.done.notify_all();
            synced?;
        }
    }
}

/// Writes the document's folder atomically. Does nothing when the complete folder
/// already exists. Blocking: call from `spawn_blocking`. The files are made durable by
/// `sync` before the folder is renamed into place, and the rename before this returns.
pub fn export(
    inbox_dir: &Path,
    doc: &ExportDocument<'_>,
    access: &InboxAccess,
    sync: &GroupSync,
) -> Result<PathBuf, ExportError> {
    let target = folder(inbox_dir, doc.message_id);
    if write_partial(inbox_dir, doc, access)?.is_some() {
        publish(inbox_dir, &[doc.message_id], sync)?;
    }
    if let Some(files) = doc.attachment_files {
        remove_attachment_files(files);
    }
    Ok(target)
}

/// The folder a document is written into before it is complete.
fn partial_folder(inbox_dir: &Path, id: &str) -> PathBuf {
    inbox_dir.join(format!("{PARTIAL_PREFIX}{id}"))
}

/// Writes the document's folder as `<inbox_dir>/.partial-<id>/`, not yet synced nor in
/// place ([`publish`] does both for many at once). Returns `None` when the complete
/// folder already exists. Blocking.
///
/// Streamed attachments are hard-linked from their received files (copied when the
/// inbox is on another filesystem), so the received copy stays until the folder is
/// published: a crash before then loses nothing (the partial folder is swept at start
/// and written again).
pub fn write_partial(
    inbox_dir: &Path,
    doc: &ExportDocument<'_>,
    access: &InboxAccess,
) -> Result<Option<PathBuf>, ExportError> {
    let access = *access;
    let target = folder(inbox_dir, doc.message_id);
    if target.is_dir() {
        return Ok(None);
    }
    let partial = partial_folder(inbox_dir, doc.message_id);
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io_at(&partial))?;
    }
    access.create_dir(&partial)?;
    if let Some(files) = doc.attachment_files {
        for (index, info) in doc.header.attachments.iter().enumerate() {
            let from = files.join(index.to_string());
            let to = partial.join(&info.name);
            if std::fs::hard_link(&from, &to).is_err() {
                // Another filesystem: a copy (synced by the publishing `syncfs`),
                // never a move, so the received file outlives a crash meanwhile.
                std::fs::copy(&from, &to).map_err(io_at(&to))?;
            }
            // A spool file keeps the mode it was made with; the inbox sets its own.
            access.apply(&to, false)?;
        }
    } else {
        for (info, bytes) in doc.header.attachments.iter().zip(doc.attachments) {
            write_new(&partial.join(&info.name), bytes, access)?;
        }
    }
    write_new(&partial.join("envelope.pb"), doc.envelope, access)?;
    if let Some(receipt) = doc.submission_receipt {
        write_new(&partial.join(SUBMISSION_RECEIPT_FILE), receipt, access)?;
    }
    if let Some(receipt) = doc.delivery_receipt {
        write_new(&partial.join(DELIVERY_RECEIPT_FILE), receipt, access)?;
    }
    let json = document_json(doc.header, doc.header_sha256, doc.received_at_ms);
    let mut text = serde_json::to_vec_pretty(&json).map_err(|e| ExportError {
        path: partial.join("document.json"),
        source: std::io::Error::other(e),
    })?;
    text.push(b'\n');
    write_new(&partial.join("document.json"), &text, access)?;
    Ok(Some(partial))
}

/// Publishes folders written by [`write_partial`]: one sync makes every file durable,
/// then each folder is renamed into place (one already there wins: the partial copy
/// is removed), then one more sync makes the renames durable. Blocking.
pub fn publish(inbox_dir: &Path, ids: &[&str], sync: &GroupSync) -> Result<(), ExportError> {
    if ids.is_empty() {
        return Ok(());
    }
    sync.sync()?;
    for id in ids {
        let partial = partial_folder(inbox_dir, id);
        let target = folder(inbox_dir, id);
        if target.is_dir() {
            if partial.exists() {
                std::fs::remove_dir_all(&partial).map_err(io_at(&partial))?;
            }
            continue;
        }
        std::fs::rename(&partial, &target).map_err(io_at(&target))?;
    }
    sync.sync()
}

/// Removes a streamed delivery's received files once its folder is published (they
/// were linked or moved into it); failures only leave files for the next sweep.
pub fn remove_attachment_files(files: &Path) {
    let _ = std::fs::remove_dir_all(files);
}

/// Removes folders left half-written by a crash. Returns how many were removed.
pub fn remove_partials(inbox_dir: &Path) -> Result<usize, ExportError> {
    let mut removed = 0;
    for entry in std::fs::read_dir(inbox_dir).map_err(io_at(inbox_dir))? {
        let entry = entry.map_err(io_at(inbox_dir))?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(PARTIAL_PREFIX)
        {
            let path = entry.path();
            std::fs::remove_dir_all(&path).map_err(io_at(&path))?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lienthong_proto::pb::AttachmentInfo;

    fn header() -> DocumentHeader {
        DocumentHeader {
            message_id: "0190a5b2-0000-7000-8000-000000000001".into(),
            sender: "000.00.00.H31".into(),
            recipients: vec!["000.00.12.H31".into()],
            subject: "Trích yếu".into(),
            issue_date: "2025/01/02".into(),
            created_at_ms: 1_700_000_000_000,
            attachments: vec![
                AttachmentInfo {
                    name: "a.pdf".into(),
                    media_type: "application/pdf".into(),
                    size: 3,
                    sha256: vec![1; 32],
                },
                AttachmentInfo {
                    name: "empty.txt".into(),
                    media_type: "text/plain".into(),
                    size: 0,
                    sha256: vec![2; 32],
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn export_is_complete_and_once() {
        let dir = tempfile::tempdir().unwrap();
        let h = header();
        // A crash left a partial folder behind.
        let stale = dir.path().join(format!("{PARTIAL_PREFIX}{}", h.message_id));
        std::fs::create_dir_all(&stale).unwrap();
        std::fs::write(stale.join("a.pdf"), b"half").unwrap();
        assert_eq!(remove_partials(dir.path()).unwrap(), 1);
        assert!(!stale.exists());

        let attachments = [Bytes::from_static(b"pdf"), Bytes::new()];
        let doc = ExportDocument {
            message_id: &h.message_id,
            envelope: b"env",
            header: &h,
            header_sha256: &[7; 32],
            received_at_ms: 1_700_000_000_500,
            attachments: &attachments,
            attachment_files: None,
            submission_receipt: Some(b"sub"),
            delivery_receipt: Some(b"del"),
        };
        let sync = GroupSync::new(dir.path()).unwrap();
        let access = InboxAccess::default();
        let path = export(dir.path(), &doc, &access, &sync).unwrap();
        assert_eq!(path, dir.path().join(&h.message_id));
        assert_eq!(std::fs::read(path.join("a.pdf")).unwrap(), b"pdf");
        assert_eq!(std::fs::read(path.join("empty.txt")).unwrap(), b"");
        assert_eq!(std::fs::read(path.join("envelope.pb")).unwrap(), b"env");
        assert_eq!(
            std::fs::read(path.join(SUBMISSION_RECEIPT_FILE)).unwrap(),
            b"sub"
        );
        assert_eq!(
            std::fs::read(path.join(DELIVERY_RECEIPT_FILE)).unwrap(),
            b"del"
        );
        // Private whatever the umask: the folder 0700, every file 0600.
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o700);
        for entry in std::fs::read_dir(&path).unwrap() {
            assert_eq!(mode(&entry.unwrap().path()), 0o600);
        }
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path.join("document.json")).unwrap()).unwrap();
        assert_eq!(json["message_id"], h.message_id.as_str());
        assert_eq!(json["subject"], "Trích yếu");
        assert_eq!(json["attachments"][0]["sha256"], hex::encode([1u8; 32]));
        assert_eq!(json["created_at"], "2023-11-14T22:13:20Z");
        assert!(json["expires_at"].is_null());

        // A second export leaves the complete folder as it is.
        std::fs::write(path.join("marker"), b"x").unwrap();
        export(dir.path(), &doc, &access, &sync).unwrap();
        assert!(path.join("marker").exists());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1);
    }
}
