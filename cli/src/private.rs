//! Files the `lienthong` process writes are private to its user.
//!
//! Invariants: the umask is 0077 before anything else runs, so every file and folder
//! the process or a library (sled, the spool, the dev PKI) creates has no group or
//! other bits unless code sets them on purpose (the inbox's gateway group). Key files
//! others can read are reported at start, not silently used.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Sets the process umask to 0077. Called first thing in `main`.
pub fn restrict_umask() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// Logs a warning when the private key at `path` is readable by its group or by
/// everyone: another local user may have copied the agency's or the broker's key.
pub fn warn_if_key_readable(path: &Path, what: &'static str) {
    let Ok(meta) = std::fs::metadata(path) else {
        // Reading the key reports a missing or unreadable file with its own error.
        return;
    };
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            key = %path.display(),
            what = %what,
            mode = %format!("{mode:04o}"),
            "the private key file is readable by other users; run chmod 600 on it"
        );
    }
}

/// The numeric id of group `name` (a number is taken as it is), from `/etc/group`.
/// Groups known only to a directory service (LDAP, SSSD) are given by number.
pub fn group_id(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("cannot read /etc/group to find group {name:?}: {e}"))?;
    groups
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let group = fields.next()?;
            let gid = fields.nth(1)?;
            (group == name).then(|| gid.parse::<u32>().ok()).flatten()
        })
        .next()
        .ok_or_else(|| format!("group {name:?} is not in /etc/group; give its numeric id instead"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_ids_by_number_and_name() {
        assert_eq!(group_id("1234"), Ok(1234));
        assert_eq!(group_id("root"), Ok(0));
        assert!(group_id("no-such-group-lienthong").is_err());
    }
}
