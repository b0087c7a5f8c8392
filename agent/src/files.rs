//! The files of streamed documents (attachments over `STREAMED_THRESHOLD`), kept beside
//! the sled store in `<data>/files/` so that no attachment is ever held whole in memory.
//!
//! Layout:
//! - `uploads/<upload id>` (complete, synced) with `uploads/<upload id>.meta` holding
//!   `<size> <sha256 hex>`; `uploads/<upload id>.part` while the body arrives.
//! - `outbox/<message id>/<index>`: a streamed document's attachments until the broker
//!   has accepted it (moved there from `uploads/` before the outbox record is written).
//! - `incoming/<message id>/<index>`: a streamed delivery being received; what is here
//!   is reported in the session's Hello so the broker resumes instead of restarting.
//!
//! Invariant: a file is named in a durable record only after it is synced, and a rename
//! is followed by a sync of the folder it landed in.

use std::path::{Path, PathBuf};

use lienthong_proto::spool::{SpoolError, sync_dir};

use crate::error::StoreError;

/// An upload made through `POST /v1/uploads`.
#[derive(Debug, Clone)]
pub struct Upload {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Files {
    root: PathBuf,
}

fn spool(e: SpoolError) -> StoreError {
    StoreError::Files(e.to_string())
}

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::Files(format!("{}: {e}", path.display()))
}

impl Files {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            root: data_dir.join("files"),
        }
    }

    pub fn uploads(&self) -> PathBuf {
        self.root.join("uploads")
    }

    pub fn outbox_dir(&self, message_id: &str) -> PathBuf {
        self.root.join("outbox").join(message_id)
    }

    pub fn incoming_root(&self) -> PathBuf {
        self.root.join("incoming")
    }

    pub fn incoming_dir(&self, message_id: &str) -> PathBuf {
        self.incoming_root().join(message_id)
    }

    /// Creates the folders. Blocking.
    pub fn create(&self) -> Result<(), StoreError> {
        for dir in [
            self.uploads(),
            self.root.join("outbox"),
            self.incoming_root(),
        ] {
            std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        }
        Ok(())
    }

    /// Records a finished upload: the `.part` file (already synced) becomes
    /// `uploads/<id>` with its size and digest beside it. Blocking.
    pub fn finish_upload(&self, id: &str, size: u64, sha256: &[u8]) -> Result<(), StoreError> {
        let dir = self.uploads();
        let part = dir.join(format!("{id}.part"));
        let meta = dir.join(format!("{id}.meta"));
        std::fs::write(&meta, format!("{size} {}", hex::encode(sha256))).map_err(io_at(&meta))?;
        std::fs::File::open(&meta)
            .and_then(|f| f.sync_all())
            .map_err(io_at(&meta))?;
        let done = dir.join(id);
        std::fs::rename(&part, &done).map_err(io_at(&done))?;
        sync_dir(&dir).map_err(spool)
    }

    /// The upload with this id, or None when there is none. Blocking.
    pub fn upload(&self, id: &str) -> Result<Option<Upload>, StoreError> {
        if !is_upload_id(id) {
            return Ok(None);
        }
        let dir = self.uploads();
        let meta = dir.join(format!("{id}.meta"));
        let text = match std::fs::read_to_string(&meta) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_at(&meta)(e)),
        };
        let mut fields = text.split_whitespace();
        let size = fields.next().and_then(|s| s.parse::<u64>().ok());
        let sha256 = fields.next().and_then(|s| hex::decode(s).ok());
        match (size, sha256) {
            (Some(size), Some(sha256)) if sha256.len() == 32 => Ok(Some(Upload {
                path: dir.join(id),
                size,
                sha256,
            })),
            _ => Err(StoreError::Files(format!("{}: unreadable", meta.display()))),
        }
    }

    /// Forgets an upload (after its bytes were taken into a document). Blocking.
    pub fn remove_upload(&self, id: &str) {
        let dir = self.uploads();
        let _ = std::fs::remove_file(dir.join(id));
        let _ = std::fs::remove_file(dir.join(format!("{id}.meta")));
    }

    /// Moves uploads into a streamed document's outbox folder, in attachment order,
    /// and syncs it. Blocking.
    pub fn take_into_outbox(
        &self,
        message_id: &str,
        uploads: &[PathBuf],
    ) -> Result<(), StoreError> {
        let dir = self.outbox_dir(message_id);
        std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        for (index, from) in uploads.iter().enumerate() {
            let to = dir.join(index.to_string());
            std::fs::rename(from, &to).map_err(io_at(&to))?;
            // `uploads/<id>` → `uploads/<id>.meta` (ids hold no dot).
            let _ = std::fs::remove_file(from.with_extension("meta"));
        }
        sync_dir(&dir).map_err(spool)?;
        sync_dir(&self.root.join("outbox")).map_err(spool)
    }

    /// Bytes held per attachment of every partly received streamed delivery.
    /// Blocking.
    pub fn partial_deliveries(&self) -> Vec<(String, Vec<u64>)> {
        let Ok(entries) = std::fs::read_dir(self.incoming_root()) else {
            return Vec::new();
        };
        let mut partial = Vec::new();
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            if !lienthong_proto::document::is_valid_message_id(&id) {
                continue;
            }
            let dir = entry.path();
            let mut lengths = Vec::new();
            for index in 0..lienthong_proto::document::MAX_ATTACHMENTS {
                match std::fs::metadata(dir.join(index.to_string())) {
                    Ok(meta) => lengths.push(meta.len()),
                    Err(_) => break,
                }
            }
            partial.push((id, lengths));
        }
        partial
    }
}

/// Upload ids are UUIDs we issued; anything else never names a file.
fn is_upload_id(id: &str) -> bool {
    uuid::Uuid::try_parse(id).is_ok_and(|u| u.hyphenated().to_string() == id)
}
