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
//! Invariants:
//! - A file is named in a durable record only after it is synced, and a rename is
//!   followed by a sync of the folder it landed in.
//! - Base64 attachments of a document large enough to be streamed (JSON, edXML, drop
//!   folder) are spooled here as uploads ([`SpoolWriter`]) before the document is
//!   acknowledged, so they take exactly the path of uploaded files.
//! - Leftovers are swept ([`Files::sweep`]): at start every `.part` (no writer survives
//!   a restart) and every outbox folder no waiting document names; on start and on a
//!   timer, uploads (and `.part` files) not touched for the configured age.
//! - Files and folders written here are private to the agent's user (0600 / 0700).

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

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

    /// Creates the folders (0700). Blocking.
    pub fn create(&self) -> Result<(), StoreError> {
        for dir in [
            self.uploads(),
            self.root.join("outbox"),
            self.incoming_root(),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io_at(&dir))?;
        }
        Ok(())
    }

    /// Starts a new upload file `uploads/<new id>.part` (0600). Blocking.
    pub fn spool(&self) -> Result<SpoolWriter, StoreError> {
        let id = uuid::Uuid::now_v7().to_string();
        let part = self.uploads().join(format!("{id}.part"));
        let file = private_file(&part).map_err(io_at(&part))?;
        Ok(SpoolWriter {
            files: self.clone(),
            id,
            part,
            file: Some(file),
            hasher: ring::digest::Context::new(&ring::digest::SHA256),
            size: 0,
        })
    }

    /// Bytes held in `uploads/` (finished uploads not yet taken into a document, and
    /// `.part` files being written) and in `outbox/` (streamed documents not yet
    /// accepted by the broker). Blocking; reads the folders, so it cannot drift.
    pub fn spool_bytes(&self) -> (u64, u64) {
        (
            bytes_under(&self.uploads()),
            bytes_under(&self.root.join("outbox")),
        )
    }

    /// Removes leftovers; returns what went. `at_start`: also every `.part` (no writer
    /// survives a restart) and every `outbox/<id>` folder for which `waiting(id)` is
    /// false (a crash between moving uploads there and storing the record, or after
    /// the submission before the folder was removed). Always: uploads and `.part` files
    /// not modified for `max_age`, and `.meta` files whose upload is gone. Blocking.
    pub fn sweep(
        &self,
        max_age: Duration,
        at_start: bool,
        waiting: impl Fn(&str) -> bool,
    ) -> Swept {
        let mut swept = Swept::default();
        let dir = self.uploads();
        let now = SystemTime::now();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return swept;
        };
        let mut metas = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            if name.ends_with(".meta") {
                metas.push((entry.path(), name));
                continue;
            }
            let part = name.ends_with(".part");
            let old = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age >= max_age);
            if ((part && at_start) || old) && std::fs::remove_file(entry.path()).is_ok() {
                swept.bytes = swept.bytes.saturating_add(meta.len());
                if part {
                    swept.parts = swept.parts.saturating_add(1);
                } else {
                    swept.uploads = swept.uploads.saturating_add(1);
                }
            }
        }
        for (path, name) in metas {
            let upload = name.trim_end_matches(".meta");
            if !dir.join(upload).exists() {
                let _ = std::fs::remove_file(path);
            }
        }
        if at_start {
            let outbox = self.root.join("outbox");
            if let Ok(entries) = std::fs::read_dir(&outbox) {
                for entry in entries.flatten() {
                    let id = entry.file_name().to_string_lossy().into_owned();
                    if waiting(&id) {
                        continue;
                    }
                    let bytes = bytes_under(&entry.path());
                    if std::fs::remove_dir_all(entry.path()).is_ok() {
                        swept.outbox_folders = swept.outbox_folders.saturating_add(1);
                        swept.bytes = swept.bytes.saturating_add(bytes);
                    }
                }
            }
        }
        if swept.bytes > 0 || swept.parts > 0 || swept.uploads > 0 {
            let _ = sync_dir(&dir);
        }
        swept
    }

    /// Records a finished upload: the `.part` file (already synced) becomes
    /// `uploads/<id>` with its size and digest beside it. Blocking.
    pub fn finish_upload(&self, id: &str, size: u64, sha256: &[u8]) -> Result<(), StoreError> {
        let dir = self.uploads();
        let part = dir.join(format!("{id}.part"));
        let meta = dir.join(format!("{id}.meta"));
        let _ = std::fs::remove_file(&meta);
        private_file(&meta)
            .and_then(|mut f| {
                f.write_all(format!("{size} {}", hex::encode(sha256)).as_bytes())?;
                f.sync_all()
            })
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
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_at(&dir))?;
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

/// Sweeps leftovers every `every` until `stop` (the sweep at start is done before the
/// API serves, by [`crate::run`]).
pub(crate) async fn sweep_periodically(
    agent: std::sync::Arc<crate::Agent>,
    max_age: Duration,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut ticks = tokio::time::interval(every.max(Duration::from_millis(10)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate: start already swept
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let files = agent.files.clone();
        match tokio::task::spawn_blocking(move || files.sweep(max_age, false, |_| true)).await {
            Ok(swept) if swept != Swept::default() => tracing::info!(
                agency = %agent.agency,
                parts = swept.parts,
                uploads = swept.uploads,
                bytes = swept.bytes,
                "swept uploads older than the configured age"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::error!(agency = %agent.agency, error = %e, "sweeping uploads failed")
            }
        }
    }
}

/// What one sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub parts: u64,
    pub uploads: u64,
    pub outbox_folders: u64,
    pub bytes: u64,
}

/// A file being spooled into `uploads/`: hashed and counted as it is written; once
/// [`SpoolWriter::finish`]ed it is an upload like one from `POST /v1/uploads`. Dropped
/// unfinished, its `.part` file is removed.
pub struct SpoolWriter {
    files: Files,
    id: String,
    part: PathBuf,
    file: Option<std::fs::File>,
    hasher: ring::digest::Context,
    size: u64,
}

impl SpoolWriter {
    /// Appends bytes. Blocking.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let Some(file) = self.file.as_mut() else {
            return Err(StoreError::Files(format!(
                "{}: already finished",
                self.part.display()
            )));
        };
        file.write_all(bytes).map_err(io_at(&self.part))?;
        self.hasher.update(bytes);
        self.size = self.size.saturating_add(bytes.len() as u64);
        Ok(())
    }

    /// Syncs the file and makes it the upload `uploads/<id>`; returns its id and
    /// description. Blocking.
    pub fn finish(mut self) -> Result<(String, Upload), StoreError> {
        let Some(file) = self.file.take() else {
            return Err(StoreError::Files(format!(
                "{}: already finished",
                self.part.display()
            )));
        };
        file.sync_data().map_err(io_at(&self.part))?;
        drop(file);
        let sha256 = self.hasher.clone().finish().as_ref().to_vec();
        self.files.finish_upload(&self.id, self.size, &sha256)?;
        let upload = Upload {
            path: self.files.uploads().join(&self.id),
            size: self.size,
            sha256,
        };
        Ok((std::mem::take(&mut self.id), upload))
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.part);
        }
    }
}

/// Creates a new file readable and writable by the agent's user only.
pub(crate) fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Total bytes of the files under `dir`, recursively; 0 when it does not exist.
fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => bytes_under(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .fold(0, u64::saturating_add)
}

/// Upload ids are UUIDs we issued; anything else never names a file.
fn is_upload_id(id: &str) -> bool {
    uuid::Uuid::try_parse(id).is_ok_and(|u| u.hyphenated().to_string() == id)
}
