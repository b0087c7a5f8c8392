//! The format marker each store records (`lienthong-broker/1`, `lienthong-agent/1`) and
//! what to tell the operator when a data directory holds another one: written by a
//! newer version (upgrade the program, or restore a backup this version made), by an
//! older one that this version cannot read, or by something else.
//!
//! Invariant: a store opens only with exactly its own marker; nothing here changes a
//! store, it only explains a refusal.

/// Why a store with marker `found` is refused by a program expecting `expected`
/// (`<kind>/<version>`), in words an operator can act on.
pub fn mismatch(found: &[u8], expected: &str) -> String {
    let found_text = String::from_utf8_lossy(found);
    let (Some((kind, version)), Some((found_kind, found_version))) =
        (split(expected), split(&found_text))
    else {
        return format!("store format {found_text:?} is not {expected:?}: not a lienthong store");
    };
    if kind != found_kind {
        return format!(
            "store format {found_text:?} is not {expected:?}: this directory belongs to a \
             {found_kind} store, not a {kind} one"
        );
    }
    if found_version > version {
        format!(
            "store format {found_text:?} was written by a newer version of lienthong than this \
             one (which reads {expected:?}): run that version or a later one, or restore a \
             backup made by this version; the store was not changed"
        )
    } else {
        format!(
            "store format {found_text:?} is older than {expected:?} and this version cannot \
             read it: upgrade through the versions in between (docs/operations.md); the store \
             was not changed"
        )
    }
}

/// `<kind>/<version>` → (kind, version).
fn split(marker: &str) -> Option<(&str, u32)> {
    let (kind, version) = marker.rsplit_once('/')?;
    Some((kind, version.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_store_names_the_newer_version_and_what_to_do() {
        let why = mismatch(b"lienthong-broker/2", "lienthong-broker/1");
        assert!(why.contains("newer version"), "{why}");
        assert!(why.contains("was not changed"), "{why}");
    }

    #[test]
    fn an_older_store_says_upgrade_through_the_versions_in_between() {
        let why = mismatch(b"lienthong-agent/0", "lienthong-agent/1");
        assert!(why.contains("older"), "{why}");
        assert!(why.contains("docs/operations.md"), "{why}");
    }

    #[test]
    fn another_kind_or_garbage_is_not_ours() {
        let why = mismatch(b"lienthong-agent/1", "lienthong-broker/1");
        assert!(why.contains("lienthong-agent store"), "{why}");
        let why = mismatch(b"\xff\xfe", "lienthong-broker/1");
        assert!(why.contains("not a lienthong store"), "{why}");
    }
}
