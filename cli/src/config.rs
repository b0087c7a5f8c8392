//! `--config FILE`: a TOML file whose keys are the subcommand's long flag names (with
//! `_` or `-`). Flags given on the command line win over the file. Unknown keys are
//! refused, naming the key, so a typo never passes silently.
//!
//! Every bad value is reported, not just the first: [`load`] names each unknown key and
//! each value of the wrong type, and commands gather their own checks in a
//! [`Problems`] list (`broker --check-config` and `agent --check-config` rely on it).

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
    let table: toml::Table =
        toml::from_str(&normalized).map_err(|e| CliError::config(path, e.message().trim()))?;
    match T::deserialize(toml::Value::Table(table.clone())) {
        Ok(value) => Ok(value),
        Err(whole) => {
            // serde stops at the first bad key: try each key alone to name them all.
            let mut problems = Problems::default();
            for (key, value) in table {
                let mut one = toml::Table::new();
                one.insert(key.clone(), value);
                if let Err(e) = T::deserialize(toml::Value::Table(one)) {
                    problems.push(CliError::config(
                        path,
                        format!("`{key}`: {}", e.message().trim()),
                    ));
                }
            }
            if problems.is_empty() {
                problems.push(CliError::config(path, whole.message().trim()));
            }
            problems.finish()?;
            Err(CliError::config(path, whole.message().trim()))
        }
    }
}

/// Every problem found in a configuration, so that one run names them all.
#[derive(Debug, Default)]
pub struct Problems(Vec<CliError>);

impl Problems {
    /// The value, or None with the error kept.
    pub fn take<T>(&mut self, result: Result<T, CliError>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(error) => {
                self.0.push(error);
                None
            }
        }
    }

    pub fn push(&mut self, error: CliError) {
        self.0.push(error);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Ok when nothing was found; one problem as it is; several as one usage error
    /// (exit status 2) listing each on its own line.
    pub fn finish(mut self) -> Result<(), CliError> {
        match self.0.len() {
            0 => Ok(()),
            1 => Err(self.0.remove(0)),
            n => {
                let mut text = format!("{n} problems in the configuration:");
                for problem in &self.0 {
                    text.push_str("\n  - ");
                    text.push_str(&problem.to_string());
                }
                Err(CliError::Usage(text))
            }
        }
    }
}

/// An error naming `path` when it cannot be opened for reading (missing, a folder,
/// no permission), so a check reports each unreadable file on its own.
pub fn readable(path: &Path) -> Result<(), CliError> {
    let metadata = std::fs::metadata(path).map_err(|e| CliError::config(path, e))?;
    if metadata.is_dir() {
        return Err(CliError::config(path, "is a directory, not a file"));
    }
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| CliError::config(path, e))
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

/// The keys a configuration file struct accepts, in declaration order, read from its
/// `Deserialize` implementation: serde's derive names every field when it asks for a
/// struct, so the list cannot drift from the struct (`lienthong docs configuration`).
pub fn keys<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut probe = KeyProbe(&[]);
    // The probe always fails, after it has seen the field names.
    let _ = T::deserialize(&mut probe);
    probe.0
}

struct KeyProbe(&'static [&'static str]);

#[derive(Debug)]
struct ProbeDone;

impl std::fmt::Display for ProbeDone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("field names read")
    }
}

impl std::error::Error for ProbeDone {}

impl serde::de::Error for ProbeDone {
    fn custom<M: std::fmt::Display>(_message: M) -> Self {
        ProbeDone
    }
}

impl<'de> serde::Deserializer<'de> for &mut KeyProbe {
    type Error = ProbeDone;

    fn deserialize_any<V: serde::de::Visitor<'de>>(
        self,
        _visitor: V,
    ) -> Result<V::Value, ProbeDone> {
        Err(ProbeDone)
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, ProbeDone> {
        self.0 = fields;
        Err(ProbeDone)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
        identifier ignored_any
    }
}
