//! `lienthong docs configuration` (hidden): docs/configuration.md, generated from the
//! clap definitions and the config file structs, so the reference cannot drift from the
//! program. A test regenerates it and fails when the committed file differs.
//!
//! Invariants: every visible flag of every visible subcommand is listed once, at the
//! command that defines it, with its help text; a flag's config key is listed only when
//! that command's `--config` file really accepts it ([`crate::config::keys`]); the
//! output depends on nothing but the definitions (no paths, dates or terminal width).

use std::fmt::Write as _;

use clap::{Arg, ArgAction, Command};

use crate::cmd;

/// How to regenerate the file, for the test's failure message and the file's header.
pub const REGENERATE: &str = "cargo run -q -- docs configuration > docs/configuration.md";

/// The Markdown text of docs/configuration.md.
pub fn configuration_markdown(root: &Command) -> String {
    let mut out = String::new();
    out.push_str("# Configuration reference\n\n");
    out.push_str(
        "Every flag of the `lienthong` command, the `--config` file key that sets the same \
         value (TOML; flags given on the command line win; relative paths in a file are \
         relative to the file), its default and what it sets or bounds. Defaults are the \
         program's own when the flag and the key are both absent.\n\n",
    );
    let _ = writeln!(
        out,
        "Generated from the program's definitions by `lienthong docs configuration`; do not \
         edit by hand. Regenerate with:\n\n    {REGENERATE}\n"
    );
    out.push_str(
        "Exit codes: 0 success, 1 the operation failed or the document is invalid, 2 bad \
         usage or configuration. `lienthong broker --check-config` and `lienthong agent \
         --check-config` check a configuration and the files it names without starting.\n",
    );
    section(&mut out, root, &[]);
    out
}

fn section(out: &mut String, command: &Command, parents: &[&str]) {
    let mut path: Vec<&str> = parents.to_vec();
    path.push(command.get_name());
    let keys = config_keys(&path);
    let args: Vec<&Arg> = command
        .get_arguments()
        .filter(|a| !a.is_hide_set())
        .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
        .collect();
    let _ = write!(out, "\n{} `{}`\n\n", heading(path.len()), path.join(" "));
    if let Some(about) = command.get_long_about().or(command.get_about()) {
        let _ = writeln!(out, "{}\n", one_line(&about.to_string()));
    }
    if !args.is_empty() {
        if keys.is_some() {
            out.push_str("| flag | config key | default | what it sets or bounds |\n");
            out.push_str("|---|---|---|---|\n");
        } else {
            out.push_str("| flag | default | what it sets or bounds |\n");
            out.push_str("|---|---|---|\n");
        }
        for arg in args {
            let help = help_text(arg);
            let mut cells = vec![format!("`{}`", flag(arg))];
            if let Some(keys) = keys {
                let id = arg.get_id().as_str();
                cells.push(if keys.contains(&id) {
                    format!("`{id}`")
                } else {
                    "—".to_owned()
                });
            }
            cells.push(default_of(arg, &help));
            let mut what = help;
            if arg.is_global_set() {
                what.push_str(" (Also accepted after any subcommand.)");
            }
            cells.push(what);
            let cells: Vec<String> = cells.iter().map(|c| c.replace('|', "\\|")).collect();
            let _ = writeln!(out, "| {} |", cells.join(" | "));
        }
        if path.as_slice() == ["lienthong"] {
            out.push_str(
                "\n`log_format` is also a key of the broker's and the agent's `--config` \
                 file.\n",
            );
        }
    }
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        section(out, sub, &path);
    }
}

fn heading(depth: usize) -> &'static str {
    match depth {
        0 | 1 => "##",
        2 => "##",
        3 => "###",
        _ => "####",
    }
}

/// The keys of the `--config` file that the command at `path` reads, if it reads one.
fn config_keys(path: &[&str]) -> Option<&'static [&'static str]> {
    match path {
        [_, "broker"] => Some(cmd::broker::config_keys()),
        [_, "agent"] => Some(cmd::agent::config_keys()),
        [_, "admin", ..] => Some(cmd::admin::config_keys()),
        [_, "pki", "dev"] => Some(cmd::pki::config_keys()),
        [_, "verify"] => Some(cmd::verify::config_keys()),
        [
            _,
            "send" | "status" | "inbox" | "report" | "recall" | "directory",
        ]
        | [_, "edxml", "export"] => Some(cmd::client::config_keys()),
        _ => None,
    }
}

/// `--name <VALUE>`, `-s, --name`, or `<NAME>` for a positional argument.
fn flag(arg: &Arg) -> String {
    let takes_value = matches!(arg.get_action(), ArgAction::Set | ArgAction::Append);
    let value = arg
        .get_value_names()
        .map(|names| {
            names
                .iter()
                .map(|n| format!("<{n}>"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|| format!("<{}>", arg.get_id().as_str().to_uppercase()));
    let Some(long) = arg.get_long() else {
        return value;
    };
    let mut text = match arg.get_short() {
        Some(short) => format!("-{short}, --{long}"),
        None => format!("--{long}"),
    };
    if takes_value {
        text.push(' ');
        text.push_str(&value);
        if matches!(arg.get_action(), ArgAction::Append) {
            text.push_str("...");
        }
    }
    text
}

fn help_text(arg: &Arg) -> String {
    let help = arg
        .get_long_help()
        .or(arg.get_help())
        .map(|h| one_line(&h.to_string()))
        .map(|h| {
            if h.is_empty() || h.ends_with(['.', ')', ':']) {
                h
            } else {
                format!("{h}.")
            }
        })
        .unwrap_or_default();
    let values: Vec<String> = arg
        .get_possible_values()
        .iter()
        .filter(|v| !v.is_hide_set())
        .map(|v| format!("`{}`", v.get_name()))
        .collect();
    // Enum flags list their values (clap knows them; the doc comment may not); a
    // switch's true/false go without saying.
    let switch = matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
    if switch || values.is_empty() || help.contains(values[0].trim_matches('`')) {
        help
    } else {
        format!("{help} Values: {}.", values.join(", "))
    }
}

/// The clap default if there is one; else the default the help text states ("default
/// 10", "Default: none"); "off" for a switch; else "—".
fn default_of(arg: &Arg, help: &str) -> String {
    let defaults: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    if !defaults.is_empty() {
        return defaults.join(", ");
    }
    if let Some(stated) = stated_default(help) {
        return stated;
    }
    if matches!(arg.get_action(), ArgAction::SetTrue) {
        return "off".to_owned();
    }
    if help.contains("Required.") || arg.is_required_set() {
        return "required".to_owned();
    }
    "—".to_owned()
}

/// The default a help text states: the first "default" followed by a value ("default
/// 10", "Default 127.0.0.1:7180", "default <data>/api-token") or by a colon ("default:
/// --cert"), up to the end of its clause. "Default expiry in hours" is no statement.
fn stated_default(help: &str) -> Option<String> {
    let lower = help.to_lowercase();
    let mut from = 0;
    while let Some(found) = lower.get(from..).and_then(|rest| rest.find("default")) {
        let start = from + found + "default".len();
        from = start;
        let Some(rest) = help.get(start..) else { break };
        let (colon, rest) = match rest.strip_prefix(':') {
            Some(rest) => (true, rest),
            None => (false, rest),
        };
        if !rest.starts_with(' ') {
            continue;
        }
        let rest = rest.trim_start();
        let value_like = rest.starts_with(|c: char| c.is_ascii_digit() || c == '<' || c == '-');
        if !(colon || value_like) {
            continue;
        }
        let mut end = rest.len();
        for stop in [")", ";", ". ", ", ", " (", " when"] {
            if let Some(i) = rest.find(stop) {
                end = end.min(i);
            }
        }
        let value = rest[..end].trim_end_matches('.').trim();
        if !value.is_empty() {
            return Some(value.to_owned());
        }
    }
    None
}

/// Doc-comment text as one Markdown table cell: lines joined, spaces collapsed.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_visible_arg(command: &Command, path: &str, missing: &mut Vec<String>) {
        for arg in command.get_arguments().filter(|a| !a.is_hide_set()) {
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                missing.push(format!("{path} {}", flag(arg)));
            }
        }
        for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
            every_visible_arg(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }

    #[test]
    fn every_flag_has_a_help_text() {
        let mut missing = Vec::new();
        every_visible_arg(
            &<crate::Cli as clap::CommandFactory>::command(),
            "lienthong",
            &mut missing,
        );
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }

    #[test]
    fn docs_configuration_md_is_up_to_date() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        let generated = format!("{}\n", crate::configuration_markdown().trim_end());
        if committed != generated {
            let first = committed
                .lines()
                .zip(generated.lines())
                .position(|(a, b)| a != b)
                .map_or_else(|| "at the end".to_owned(), |i| format!("at line {}", i + 1));
            panic!(
                "docs/configuration.md is out of date (first difference {first}); regenerate \
                 it from the workspace root with:\n    {REGENERATE}"
            );
        }
    }

    #[test]
    fn config_keys_come_from_the_file_structs() {
        let keys = crate::cmd::broker::config_keys();
        assert!(keys.contains(&"max_connections"), "{keys:?}");
        assert!(keys.contains(&"log_format"), "{keys:?}");
        assert!(crate::cmd::agent::config_keys().contains(&"api_hosts"));
    }

    #[test]
    fn defaults_are_read_from_help_texts() {
        assert_eq!(
            stated_default("Seconds to wait (default 10)."),
            Some("10".into())
        );
        assert_eq!(
            stated_default("Local HTTP API address. Default 127.0.0.1:7180."),
            Some("127.0.0.1:7180".into())
        );
        assert_eq!(
            stated_default("Default expiry in hours (default 168,72,24,8,8)."),
            Some("168,72,24,8,8".into())
        );
        assert_eq!(
            stated_default("Sign with this (default: --cert)."),
            Some("--cert".into())
        );
        assert_eq!(stated_default("No such thing."), None);
    }
}
