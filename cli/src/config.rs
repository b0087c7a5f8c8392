//! `--config FILE`: a TOML file whose keys are the subcommand's long flag names (with
//! `_` or `-`). Flags given on the command line win over the file. Unknown keys are
//! refused, naming the key, so a typo never passes silently.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::error::CliError;

/// Reads `path` into `T`, or `T::default()` when no file is given.
pub fn load<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, CliError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path).map_err(|e| CliError::config(path, e))?;
    let normalized = normalize_keys(&text);
    toml::from_str(&normalized).map_err(|e| CliError::config(path, e.message()))
}

/// Accepts `admin-listen` as well as `admin_listen` for top-level keys.
fn normalize_keys(text: &str) -> String {
    text.lines()
        .map(|line| {
            let trimmed = line.trim_start();
            match trimmed.split_once('=') {
                Some((key, rest)) if !trimmed.starts_with('#') && !key.contains('"') => {
                    format!("{}={rest}", key.replace('-', "_"))
                }
                _ => line.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The flag if given, else the file's value, else an error naming both ways to set it.
pub fn required<T>(flag: Option<T>, file: Option<T>, name: &str) -> Result<T, CliError> {
    flag.or(file).ok_or_else(|| {
        CliError::Usage(format!(
            "--{name} is required (give the flag or `{}` in the --config file)",
            name.replace('-', "_")
        ))
    })
}

/// Resolves a path from the config file relative to the file's directory.
pub fn relative_to(config: Option<&Path>, path: PathBuf) -> PathBuf {
    match config.and_then(Path::parent) {
        Some(dir) if path.is_relative() => dir.join(path),
        _ => path,
    }
}
