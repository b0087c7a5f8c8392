//! The drop folder, for software that can only write files: every `*.edxml` package
//! written into it is imported exactly like `POST /v1/edxml`
//! ([`crate::edxml_api::import_package`]).
//!
//! Layout: `<drop>/NAME.edxml` waiting; once accepted it moves to `<drop>/sent/NAME.edxml`
//! next to `sent/NAME.edxml.json` (what `POST /v1/edxml` answers: message and business
//! id, and the `edxml` object naming the fields read but not carried); once
//! refused it moves to `<drop>/failed/NAME.edxml` next to `failed/NAME.edxml.error.txt`
//! (the reason, naming the edXML field and rule). A name already taken there gets a
//! `-1`, `-2`… suffix. A package accepted here but then refused for good by the broker
//! (its outbox record ends `failed`) moves on from `sent/` to `failed/` the same way,
//! the reason the broker gave in its `.error.txt`, and its `.json` note beside it.
//!
//! Invariants:
//! - A file is taken only once it is complete: its size and modification time did not
//!   change between two polls (one second apart), or it was last modified long enough
//!   ago (a writer that wrote elsewhere and renamed it into place). Names starting with
//!   `.` are ignored, so writers can use them for files in progress.
//! - No file is lost or deleted: it moves (a rename in the same folder tree) only after
//!   the agent's answer; a temporary failure (store, full outbox) leaves it in place to
//!   be retried later.
//! - A crash after a document was accepted but before its file moved sends it again
//!   at the next start (at least once, as for a gateway retrying a request).
//! - `sent/NAME.json` names the message id: every such note is checked against the
//!   durable outbox record at start and at every poll until the record is final, so a
//!   refusal by the broker is filed under `failed/` even across restarts. The note
//!   moves last: a move interrupted by a crash is finished at the next start, never
//!   done twice.
//! - Logs name files and outcomes, never package contents.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::http::StatusCode;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::Agent;
use crate::api::ApiError;
use crate::api_types::SendResponse;
use crate::store::OutboxState;

/// How often the folder is listed.
pub const POLL: Duration = Duration::from_secs(1);
/// A file last modified this long ago is taken at first sight.
pub const SETTLED: Duration = Duration::from_secs(3);
/// How long a file waits after a temporary failure before it is tried again.
pub const RETRY: Duration = Duration::from_secs(10);
/// Accepted packages move here.
pub const SENT_DIR: &str = "sent";
/// Refused packages move here.
pub const FAILED_DIR: &str = "failed";
/// The extension of packages (compared without case).
pub const EXTENSION: &str = ".edxml";

/// What was seen of a file at the last poll.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    len: u64,
    modified: Option<SystemTime>,
    /// After a temporary failure: not before then.
    retry_at: Option<tokio::time::Instant>,
}

/// Watches `dir` until `stop` is cancelled.
pub(crate) async fn run(agent: Arc<Agent>, dir: PathBuf, stop: CancellationToken) {
    info!(agency = %agent.agency, drop_dir = %dir.display(), "drop folder watched");
    let mut seen: HashMap<OsString, Seen> = HashMap::new();
    let listing = dir.clone();
    let mut unsettled = tokio::task::spawn_blocking(move || sent_notes(&listing))
        .await
        .unwrap_or_default();
    let mut ticks = tokio::time::interval(POLL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut folder_ok = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if !unsettled.is_empty() {
            settle(&agent, &dir, &mut unsettled).await;
        }
        match poll(&agent, &dir, &mut seen, &mut unsettled, &stop).await {
            Ok(()) => folder_ok = true,
            Err(e) => {
                // Logged once until it works again, not every second.
                if folder_ok {
                    error!(agency = %agent.agency, drop_dir = %dir.display(), error = %e, "cannot read the drop folder; retrying");
                }
                folder_ok = false;
            }
        }
    }
}

fn is_package(name: &str) -> bool {
    !name.starts_with('.')
        && name.len() > EXTENSION.len()
        && name
            .get(name.len() - EXTENSION.len()..)
            .is_some_and(|ext| ext.eq_ignore_ascii_case(EXTENSION))
}

/// One pass over the folder: takes every complete package, one after the other.
async fn poll(
    agent: &Arc<Agent>,
    dir: &Path,
    seen: &mut HashMap<OsString, Seen>,
    unsettled: &mut BTreeMap<String, String>,
    stop: &CancellationToken,
) -> std::io::Result<()> {
    tokio::fs::create_dir_all(dir.join(SENT_DIR)).await?;
    tokio::fs::create_dir_all(dir.join(FAILED_DIR)).await?;
    let mut listing = tokio::fs::read_dir(dir).await?;
    let mut ready = Vec::new();
    let mut present = Vec::new();
    while let Some(entry) = listing.next_entry().await? {
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str().filter(|n| is_package(n)) else {
            continue;
        };
        let Ok(meta) = tokio::fs::metadata(entry.path()).await else {
            continue; // gone since the listing
        };
        if !meta.is_file() {
            continue;
        }
        present.push(file_name.clone());
        let now = Seen {
            len: meta.len(),
            modified: meta.modified().ok(),
            retry_at: None,
        };
        let previous = seen.get(&file_name);
        let stable = previous.is_some_and(|p| p.len == now.len && p.modified == now.modified);
        let settled = previous.is_none()
            && now
                .modified
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age >= SETTLED);
        let waiting = previous
            .and_then(|p| p.retry_at)
            .is_some_and(|at| tokio::time::Instant::now() < at);
        let retry_at = previous.and_then(|p| p.retry_at);
        if (stable || settled) && !waiting {
            ready.push(name.to_owned());
        }
        seen.insert(file_name, Seen { retry_at, ..now });
    }
    seen.retain(|name, _| present.contains(name));
    ready.sort();
    for name in ready {
        if stop.is_cancelled() {
            break;
        }
        let key = OsString::from(&name);
        let pause = match take(agent, dir, &name).await {
            Outcome::Done => {
                seen.remove(&key);
                continue;
            }
            Outcome::Sent { note, message_id } => {
                seen.remove(&key);
                unsettled.insert(note, message_id);
                continue;
            }
            Outcome::Retry => RETRY,
            Outcome::Stuck => STUCK,
        };
        if let Some(entry) = seen.get_mut(&key) {
            entry.retry_at = Some(tokio::time::Instant::now() + pause);
        }
    }
    Ok(())
}

enum Outcome {
    /// Filed under `failed/` (or gone).
    Done,
    /// Filed under `sent/` with this note (file name in `sent/`) naming the message id.
    Sent { note: String, message_id: String },
    /// Not sent yet for a passing reason: try again after [`RETRY`].
    Retry,
    /// Sent but not filed: not again while this agent runs (it would send it twice).
    Stuck,
}

/// How long a file sent but not filed is left alone.
const STUCK: Duration = Duration::from_secs(365 * 24 * 3600);

/// Whether a refusal is for good (the package itself is wrong) rather than a passing
/// condition of the agent; with the reason.
fn classify(e: &ApiError) -> (bool, String) {
    match e {
        ApiError::BadRequest(reason) | ApiError::NotFound(reason) => (true, reason.clone()),
        ApiError::Rejected(status, reason) => (
            *status != StatusCode::TOO_MANY_REQUESTS && !status.is_server_error(),
            reason.clone(),
        ),
        ApiError::Internal => (
            false,
            "internal error of the agent's store; see the agent's log".to_owned(),
        ),
    }
}

/// Imports `<dir>/<name>` and files it under `sent/` or `failed/`.
async fn take(agent: &Arc<Agent>, dir: &Path, name: &str) -> Outcome {
    let path = dir.join(name);
    let limit = crate::edxml_api::package_limits(agent).max_package_bytes;
    let outcome = match tokio::fs::metadata(&path).await {
        Ok(meta) if meta.len() > limit as u64 => Err((
            true,
            format!(
                "the package is {} bytes, over the limit of {limit} bytes (api_max_body_bytes)",
                meta.len()
            ),
        )),
        Ok(_) => match tokio::fs::read(&path).await {
            Ok(bytes) => crate::edxml_api::import_package(agent, Bytes::from(bytes))
                .await
                .map_err(|e| classify(&e)),
            Err(e) => {
                debug!(file = %path.display(), error = %e, "a dropped file could not be read");
                return Outcome::Retry;
            }
        },
        Err(e) => {
            debug!(file = %path.display(), error = %e, "a dropped file is gone");
            return Outcome::Done;
        }
    };
    let (folder, suffix, note) = match &outcome {
        Ok(imported) => (SENT_DIR, ".json", sent_note(imported)),
        Err((true, reason)) => (FAILED_DIR, ".error.txt", format!("{reason}\n").into_bytes()),
        Err((false, reason)) => {
            warn!(agency = %agent.agency, file = %name, reason = %reason, "dropped package not sent yet; will retry");
            return Outcome::Retry;
        }
    };
    let (from, to_dir, file) = (path.clone(), dir.join(folder), name.to_owned());
    let filed =
        tokio::task::spawn_blocking(move || file_away(&from, &to_dir, &file, suffix, &note))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
    match (&outcome, filed) {
        (Ok(crate::edxml_api::Imported { response, .. }), Ok(target)) => {
            info!(
                agency = %agent.agency,
                file = %name,
                moved_to = %target.display(),
                message_id = %response.message_id,
                business_id = %response.business_id,
                "dropped package sent"
            );
            let note = target
                .file_name()
                .map(|n| format!("{}.json", n.to_string_lossy()))
                .unwrap_or_default();
            return Outcome::Sent {
                note,
                message_id: response.message_id.clone(),
            };
        }
        (Err((_, reason)), Ok(target)) => warn!(
            agency = %agent.agency,
            file = %name,
            moved_to = %target.display(),
            reason = %reason,
            "dropped package refused"
        ),
        (Ok(crate::edxml_api::Imported { response, .. }), Err(e)) => {
            error!(
                agency = %agent.agency,
                file = %name,
                message_id = %response.message_id,
                error = %e,
                "dropped package sent but could not be moved to sent/; move it by hand, or \
                 it is sent again when the agent restarts"
            );
            return Outcome::Stuck;
        }
        (Err(_), Err(e)) => {
            error!(agency = %agent.agency, file = %name, error = %e, "dropped package refused but could not be moved to failed/");
            return Outcome::Retry;
        }
    }
    Outcome::Done
}

/// The notes in `sent/` (`NAME.json` → message id). Blocking.
fn sent_notes(dir: &Path) -> BTreeMap<String, String> {
    let mut notes = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir.join(SENT_DIR)) else {
        return notes;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        let response = std::fs::read(entry.path())
            .ok()
            .and_then(|bytes| serde_json::from_slice::<SendResponse>(&bytes).ok());
        if let Some(response) = response {
            notes.insert(name, response.message_id);
        }
    }
    notes
}

/// Checks the documents of sent packages against the outbox: a package whose document
/// the broker refused for good moves to `failed/`; one accepted (or unknown here) is
/// settled and no longer checked.
async fn settle(agent: &Arc<Agent>, dir: &Path, unsettled: &mut BTreeMap<String, String>) {
    let checking = Arc::clone(agent);
    let (folder, notes) = (dir.to_owned(), unsettled.clone());
    let settled = tokio::task::spawn_blocking(move || {
        let mut settled = Vec::new();
        for (note, message_id) in notes {
            let record = match checking.store.outbox_record(&message_id) {
                Ok(record) => record,
                Err(e) => {
                    error!(agency = %checking.agency, message_id = %message_id, error = %e, "cannot read the outbox");
                    continue;
                }
            };
            let Some(record) = record else {
                settled.push(note);
                continue;
            };
            match record.state {
                OutboxState::Outbox => {}
                OutboxState::Submitted => settled.push(note),
                OutboxState::Failed => {
                    let reason = format!(
                        "the broker refused document {message_id}: {}\n",
                        record.failure_reason.as_deref().unwrap_or("no reason given")
                    );
                    match refile_failed(&folder, &note, &message_id, reason.as_bytes()) {
                        Ok(target) => {
                            warn!(
                                agency = %checking.agency,
                                message_id = %message_id,
                                moved_to = %target.display(),
                                reason = %reason.trim_end(),
                                "sent package refused by the broker; moved to failed/"
                            );
                            settled.push(note);
                        }
                        Err(e) => {
                            error!(agency = %checking.agency, note = %note, error = %e, "cannot move a refused package from sent/ to failed/; will retry");
                        }
                    }
                }
            }
        }
        settled
    })
    .await
    .unwrap_or_default();
    for note in settled {
        unsettled.remove(&note);
    }
}

/// Moves the sent package of `sent/<note>` (`NAME.json` for `NAME`) to `failed/` with
/// `reason` in its `.error.txt`, then the note beside it. Idempotent: when the package
/// already left `sent/` (a crash in the middle), the move is finished on the entry in
/// `failed/` that has no note yet and no reason, or the reason naming `message_id`.
/// Blocking.
fn refile_failed(
    dir: &Path,
    note: &str,
    message_id: &str,
    reason: &[u8],
) -> std::io::Result<PathBuf> {
    let sent = dir.join(SENT_DIR);
    let failed = dir.join(FAILED_DIR);
    let package = note.strip_suffix(".json").unwrap_or(note);
    let target = if sent.join(package).exists() {
        file_away(&sent.join(package), &failed, package, ".error.txt", reason)?
    } else {
        match unfinished_failed_entry(&failed, package, message_id) {
            Some(target) => {
                let name = target
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if !failed.join(format!("{name}.error.txt")).exists() {
                    write_note(&failed, &format!("{name}.error.txt"), reason)?;
                }
                target
            }
            None => {
                // Nothing to finish: the package is gone (moved by hand?).
                std::fs::remove_file(sent.join(note))?;
                std::fs::File::open(&sent)?.sync_all()?;
                return Ok(sent.join(package));
            }
        }
    };
    let target_name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::fs::rename(sent.join(note), failed.join(format!("{target_name}.json")))?;
    std::fs::File::open(&failed)?.sync_all()?;
    std::fs::File::open(&sent)?.sync_all()?;
    Ok(target)
}

/// An entry of `failed/` for `package` (its name or `stem-N.ext`) that has no `.json`
/// note, and either no `.error.txt` or one naming `message_id`: a move from `sent/`
/// interrupted before the note followed (entries refused at intake have a reason that
/// names no message id).
fn unfinished_failed_entry(failed: &Path, package: &str, message_id: &str) -> Option<PathBuf> {
    let (stem, ext) = package.rsplit_once('.').unwrap_or((package, ""));
    let matches = |name: &str| {
        name == package
            || name
                .strip_prefix(stem)
                .and_then(|rest| rest.strip_prefix('-'))
                .and_then(|rest| rest.strip_suffix(ext))
                .and_then(|rest| rest.strip_suffix('.'))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let mut candidates: Vec<String> = std::fs::read_dir(failed)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| matches(name))
        .filter(|name| !failed.join(format!("{name}.json")).exists())
        .filter(
            |name| match std::fs::read_to_string(failed.join(format!("{name}.error.txt"))) {
                Ok(reason) => reason.contains(message_id),
                Err(e) => e.kind() == std::io::ErrorKind::NotFound,
            },
        )
        .collect();
    candidates.sort();
    candidates.first().map(|name| failed.join(name))
}

/// Writes `dir/name` durably (through a hidden temporary file). Blocking.
fn write_note(dir: &Path, name: &str, note: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let partial = dir.join(format!(".{name}.partial"));
    let _ = std::fs::remove_file(&partial);
    let mut file = crate::files::private_file(&partial)?;
    file.write_all(note)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&partial, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

fn sent_note(imported: &crate::edxml_api::Imported) -> Vec<u8> {
    let mut json = serde_json::to_vec_pretty(&imported.json()).unwrap_or_default();
    json.push(b'\n');
    json
}

/// A free path for `name` in `dir`: the name itself, else `stem-1.ext`, `stem-2.ext`…
fn free_path(dir: &Path, name: &str, suffix: &str) -> PathBuf {
    let taken = |candidate: &str| {
        dir.join(candidate).exists() || dir.join(format!("{candidate}{suffix}")).exists()
    };
    if !taken(name) {
        return dir.join(name);
    }
    let (stem, ext) = name.rsplit_once('.').unwrap_or((name, ""));
    for n in 1u32.. {
        let candidate = format!("{stem}-{n}.{ext}");
        if !taken(&candidate) {
            return dir.join(candidate);
        }
    }
    dir.join(format!("{stem}-{}.{ext}", uuid::Uuid::now_v7()))
}

/// Moves `from` into `to_dir` (under a free name) and writes `<moved name><suffix>`
/// holding `note`; both durable on return. Blocking.
fn file_away(
    from: &Path,
    to_dir: &Path,
    name: &str,
    suffix: &str,
    note: &[u8],
) -> std::io::Result<PathBuf> {
    let target = free_path(to_dir, name, suffix);
    std::fs::rename(from, &target)?;
    let target_name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| name.to_owned());
    write_note(to_dir, &format!("{target_name}{suffix}"), note)?;
    if let Some(parent) = from.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_are_edxml_files_not_hidden() {
        assert!(is_package("cong-van.edxml"));
        assert!(is_package("CONG-VAN.EDXML"));
        assert!(!is_package(".cong-van.edxml"));
        assert!(!is_package("cong-van.edxml.tmp"));
        assert!(!is_package(".edxml"));
        assert!(!is_package("cong-van.xml"));
    }

    #[test]
    fn taken_names_get_a_suffix() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            free_path(dir.path(), "a.edxml", ".json"),
            dir.path().join("a.edxml")
        );
        std::fs::write(dir.path().join("a.edxml"), b"x").unwrap();
        assert_eq!(
            free_path(dir.path(), "a.edxml", ".json"),
            dir.path().join("a-1.edxml")
        );
        std::fs::write(dir.path().join("a-1.edxml.json"), b"x").unwrap();
        assert_eq!(
            free_path(dir.path(), "a.edxml", ".json"),
            dir.path().join("a-2.edxml")
        );
    }

    /// A drop folder with `sent/NAME` and its note, as `take` leaves it.
    fn sent_package(dir: &Path, name: &str, id: &str) {
        for sub in [SENT_DIR, FAILED_DIR] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(dir.join(SENT_DIR).join(name), b"package").unwrap();
        let note = sent_note(&crate::edxml_api::Imported {
            response: SendResponse {
                message_id: id.into(),
                business_id: "b".into(),
            },
            notes: crate::edxml_api::ReadNotes {
                steering_type: Some(0),
                not_carried: Vec::new(),
            },
        });
        std::fs::write(dir.join(SENT_DIR).join(format!("{name}.json")), note).unwrap();
    }

    #[test]
    fn refused_sent_packages_move_to_failed_once() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // An unrelated intake refusal of the same name is already there.
        std::fs::create_dir_all(d.join(FAILED_DIR)).unwrap();
        std::fs::write(d.join(FAILED_DIR).join("x.edxml"), b"other").unwrap();
        std::fs::write(d.join(FAILED_DIR).join("x.edxml.error.txt"), b"bad\n").unwrap();
        sent_package(d, "x.edxml", "id-1");
        assert_eq!(sent_notes(d).get("x.edxml.json").unwrap(), "id-1");
        let target = refile_failed(d, "x.edxml.json", "id-1", b"refused id-1\n").unwrap();
        assert_eq!(target, d.join(FAILED_DIR).join("x-1.edxml"));
        assert_eq!(std::fs::read(&target).unwrap(), b"package");
        assert_eq!(
            std::fs::read(d.join(FAILED_DIR).join("x-1.edxml.error.txt")).unwrap(),
            b"refused id-1\n"
        );
        assert!(d.join(FAILED_DIR).join("x-1.edxml.json").exists());
        assert!(sent_notes(d).is_empty());
        assert_eq!(std::fs::read_dir(d.join(SENT_DIR)).unwrap().count(), 0);
        assert_eq!(
            std::fs::read(d.join(FAILED_DIR).join("x.edxml")).unwrap(),
            b"other"
        );
    }

    #[test]
    fn an_interrupted_move_is_finished_not_repeated() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join(FAILED_DIR)).unwrap();
        std::fs::write(d.join(FAILED_DIR).join("x.edxml"), b"other").unwrap();
        std::fs::write(d.join(FAILED_DIR).join("x.edxml.error.txt"), b"bad\n").unwrap();
        sent_package(d, "x.edxml", "id-2");
        // The crash came after the package moved, before its reason was written.
        std::fs::rename(
            d.join(SENT_DIR).join("x.edxml"),
            d.join(FAILED_DIR).join("x-1.edxml"),
        )
        .unwrap();
        let target = refile_failed(d, "x.edxml.json", "id-2", b"refused id-2\n").unwrap();
        assert_eq!(target, d.join(FAILED_DIR).join("x-1.edxml"));
        assert_eq!(
            std::fs::read(d.join(FAILED_DIR).join("x-1.edxml.error.txt")).unwrap(),
            b"refused id-2\n"
        );
        assert!(d.join(FAILED_DIR).join("x-1.edxml.json").exists());
        assert!(!d.join(FAILED_DIR).join("x.edxml.json").exists());
        assert_eq!(std::fs::read_dir(d.join(SENT_DIR)).unwrap().count(), 0);
        // Nothing more to do: the note is gone from sent/.
        assert!(sent_notes(d).is_empty());
    }

    #[test]
    fn filing_moves_the_file_and_writes_the_note() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("x.edxml");
        std::fs::write(&from, b"package").unwrap();
        let failed = dir.path().join(FAILED_DIR);
        std::fs::create_dir_all(&failed).unwrap();
        let target = file_away(&from, &failed, "x.edxml", ".error.txt", b"why\n").unwrap();
        assert_eq!(target, failed.join("x.edxml"));
        assert!(!from.exists());
        assert_eq!(std::fs::read(&target).unwrap(), b"package");
        assert_eq!(
            std::fs::read(failed.join("x.edxml.error.txt")).unwrap(),
            b"why\n"
        );
    }
}
