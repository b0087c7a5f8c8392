//! Attachment files written chunk by chunk: how streamed documents are received by the
//! broker (from a sender) and by an agent (from the broker) in constant memory.
//!
//! Invariants:
//! - A [`PartialAttachment`] holds exactly the first [`PartialAttachment::stored`] bytes
//!   of one attachment. Chunks must continue from there: bytes already held are skipped
//!   (a resumed transfer may repeat some), a chunk beyond the end is a gap and refused.
//! - The SHA-256 is computed as the bytes pass; after a resume the bytes already on disk
//!   are hashed once first. Nothing is declared complete until the size and digest match
//!   the signed header and the file is synced ([`PartialAttachment::finish`]).
//! - Never more than one chunk of an attachment is held in memory here.
//!
//! All functions block: call them from `spawn_blocking`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::ProtocolError;
use crate::agency::printable;
use crate::pb::AttachmentInfo;

/// Bytes read from disk at a time when hashing a resumed prefix or sending a file.
pub const READ_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "attachment {index}: a chunk at offset {offset} leaves a gap after the {stored} bytes held"
    )]
    Gap {
        index: usize,
        offset: u64,
        stored: u64,
    },
    #[error(transparent)]
    Mismatch(#[from] ProtocolError),
}

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One attachment being received into a file.
pub struct PartialAttachment {
    path: PathBuf,
    file: File,
    index: usize,
    info: AttachmentInfo,
    stored: u64,
    held_at_open: u64,
    hasher: Option<ring::digest::Context>,
}

impl PartialAttachment {
    /// Opens (or creates) the file of attachment `index`; bytes already there count as
    /// received. A file longer than the declared size is cut back to nothing: it cannot
    /// be a prefix of this attachment.
    pub fn open(path: &Path, index: usize, info: &AttachmentInfo) -> Result<Self, SpoolError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_at(path))?;
        let mut stored = file.metadata().map_err(io_at(path))?.len();
        if stored > info.size {
            file.set_len(0).map_err(io_at(path))?;
            stored = 0;
        }
        Ok(Self {
            path: path.to_owned(),
            file,
            index,
            info: info.clone(),
            stored,
            held_at_open: stored,
            hasher: None,
        })
    }

    /// Bytes of the attachment held in the file.
    pub fn stored(&self) -> u64 {
        self.stored
    }

    /// True when bytes from an earlier transfer were found at open: a digest mismatch
    /// may then be damage on our side (a crash) rather than the sender's fault.
    pub fn resumed(&self) -> bool {
        self.held_at_open > 0
    }

    pub fn is_complete(&self) -> bool {
        self.stored == self.info.size
    }

    fn mismatch(&self, detail: String) -> SpoolError {
        SpoolError::Mismatch(ProtocolError::AttachmentMismatch {
            index: self.index,
            name: printable(&self.info.name),
            detail,
        })
    }

    /// Feeds the hasher, first with the bytes already on disk when this is a resume.
    fn hash(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        if self.hasher.is_none() {
            let mut context = ring::digest::Context::new(&ring::digest::SHA256);
            if self.stored > 0 {
                let mut reader = File::open(&self.path).map_err(io_at(&self.path))?;
                let mut left = self.stored;
                let mut buffer = vec![0u8; READ_BYTES];
                while left > 0 {
                    let want = usize::try_from(left).unwrap_or(READ_BYTES).min(READ_BYTES);
                    let slice = buffer.get_mut(..want).unwrap_or_default();
                    reader.read_exact(slice).map_err(io_at(&self.path))?;
                    context.update(slice);
                    left -= want as u64;
                }
            }
            self.hasher = Some(context);
        }
        if let Some(context) = self.hasher.as_mut() {
            context.update(bytes);
        }
        Ok(())
    }

    /// Appends the part of `data` (which starts at `offset`) not yet held.
    pub fn write_chunk(&mut self, offset: u64, data: &[u8]) -> Result<(), SpoolError> {
        if offset > self.stored {
            return Err(SpoolError::Gap {
                index: self.index,
                offset,
                stored: self.stored,
            });
        }
        let skip = usize::try_from(self.stored - offset).unwrap_or(usize::MAX);
        let Some(new) = data.get(skip..) else {
            return Ok(()); // all of it is held already
        };
        if new.is_empty() {
            return Ok(());
        }
        let end = self.stored.saturating_add(new.len() as u64);
        if end > self.info.size {
            return Err(self.mismatch(format!("more than the declared {} bytes", self.info.size)));
        }
        self.hash(new)?;
        let path = self.path.clone();
        self.file
            .seek(SeekFrom::Start(self.stored))
            .map_err(io_at(&path))?;
        self.file.write_all(new).map_err(io_at(&path))?;
        self.stored = end;
        Ok(())
    }

    /// Checks the size and digest against the header and syncs the file. On a digest
    /// mismatch the file is emptied, so a retry starts from zero.
    pub fn finish(mut self) -> Result<PathBuf, SpoolError> {
        if self.stored != self.info.size {
            return Err(self.mismatch(format!(
                "{} bytes received, the header declares {}",
                self.stored, self.info.size
            )));
        }
        self.hash(&[])?;
        let digest = self
            .hasher
            .take()
            .map(|context| context.finish())
            .ok_or_else(|| self.mismatch("no digest".into()))?;
        if digest.as_ref() != self.info.sha256.as_slice() {
            let _ = self.file.set_len(0);
            return Err(self.mismatch("SHA-256 does not match the header".into()));
        }
        self.file.sync_data().map_err(io_at(&self.path))?;
        Ok(self.path)
    }
}

/// Opens (creating `dir` if needed) the files `dir/<index>` of every attachment in
/// `infos`, continuing whatever an earlier transfer left there.
pub fn open_all(
    dir: &Path,
    infos: &[AttachmentInfo],
) -> Result<Vec<PartialAttachment>, SpoolError> {
    std::fs::create_dir_all(dir).map_err(io_at(dir))?;
    infos
        .iter()
        .enumerate()
        .map(|(index, info)| PartialAttachment::open(&dir.join(index.to_string()), index, info))
        .collect()
}

/// Reads `path` from `offset` in pieces of at most `piece` bytes, calling `each` with
/// the offset and bytes of every piece until the end of the file or until `each`
/// returns false.
pub fn read_pieces(
    path: &Path,
    offset: u64,
    piece: usize,
    mut each: impl FnMut(u64, Vec<u8>) -> bool,
) -> Result<(), SpoolError> {
    let mut file = File::open(path).map_err(io_at(path))?;
    file.seek(SeekFrom::Start(offset)).map_err(io_at(path))?;
    let mut at = offset;
    loop {
        let mut buffer = vec![0u8; piece.max(1)];
        let mut filled = 0;
        while filled < buffer.len() {
            let n = file
                .read(buffer.get_mut(filled..).unwrap_or_default())
                .map_err(io_at(path))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            return Ok(());
        }
        buffer.truncate(filled);
        if !each(at, buffer) {
            return Ok(());
        }
        at += filled as u64;
    }
}

/// Syncs a directory, so entries created or renamed in it survive a crash.
pub fn sync_dir(path: &Path) -> Result<(), SpoolError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io_at(path))
}

/// Renames `from` to `to`, copying when they are on different filesystems. The copy
/// is synced before the source is removed.
pub fn move_file(from: &Path, to: &Path) -> Result<(), SpoolError> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(18) => {
            // EXDEV: another filesystem.
            let mut source = File::open(from).map_err(io_at(from))?;
            let mut target = File::create(to).map_err(io_at(to))?;
            std::io::copy(&mut source, &mut target).map_err(io_at(to))?;
            target.sync_data().map_err(io_at(to))?;
            std::fs::remove_file(from).map_err(io_at(from))
        }
        Err(source) => Err(SpoolError::Io {
            path: to.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::document::describe_attachment;

    #[test]
    fn resumes_skips_repeats_refuses_gaps_and_checks_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let info = describe_attachment("a.bin", "application/octet-stream", &bytes);
        let path = dir.path().join("0");
        let mut part = PartialAttachment::open(&path, 0, &info).unwrap();
        part.write_chunk(0, &bytes[..30_000]).unwrap();
        drop(part);
        // The link broke; a new transfer resumes from what is held.
        let mut part = PartialAttachment::open(&path, 0, &info).unwrap();
        assert_eq!(part.stored(), 30_000);
        assert!(matches!(
            part.write_chunk(40_000, &bytes[40_000..50_000]),
            Err(SpoolError::Gap { stored: 30_000, .. })
        ));
        // A repeat overlapping what is held only adds the new part.
        part.write_chunk(20_000, &bytes[20_000..60_000]).unwrap();
        part.write_chunk(60_000, &bytes[60_000..]).unwrap();
        assert!(part.is_complete());
        let done = part.finish().unwrap();
        assert_eq!(std::fs::read(done).unwrap(), bytes);

        let mut wrong = info.clone();
        wrong.sha256 = vec![0; 32];
        let other = dir.path().join("1");
        let mut part = PartialAttachment::open(&other, 1, &wrong).unwrap();
        part.write_chunk(0, &bytes).unwrap();
        assert!(matches!(
            part.finish(),
            Err(SpoolError::Mismatch(
                ProtocolError::AttachmentMismatch { .. }
            ))
        ));
        assert_eq!(std::fs::metadata(&other).unwrap().len(), 0);

        let mut part = PartialAttachment::open(&other, 1, &info).unwrap();
        assert!(matches!(
            part.write_chunk(0, &[bytes.clone(), vec![1]].concat()),
            Err(SpoolError::Mismatch(_))
        ));
    }

    #[test]
    fn reads_pieces_from_an_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 10_000]).unwrap();
        let mut seen = Vec::new();
        read_pieces(&path, 1_000, 4_096, |at, bytes| {
            seen.push((at, bytes.len()));
            true
        })
        .unwrap();
        assert_eq!(seen, vec![(1_000, 4_096), (5_096, 4_096), (9_192, 808)]);
    }
}
