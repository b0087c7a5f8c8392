//! What the CLI writes to people: stdout that may close early, stderr that may be a
//! dead pipe, and untrusted text that must not rearrange the screen.
//!
//! Invariants:
//! - Text that came from another agency, the broker or a file (subjects, names,
//!   reasons, attachment names...) is printed through [`escape`]: control and format
//!   characters become `\u{XXXX}`, so nobody can forge a second line in a listing or
//!   reverse part of one with a bidi override.
//! - A closed stdout (`lienthong inbox | head -1`) ends the command quietly with exit
//!   status 0, as a Unix tool killed by SIGPIPE would: Rust ignores SIGPIPE and
//!   `println!` would panic instead. Every line goes through [`outln!`].
//! - Logging never takes the process down: [`QuietStderr`] drops what it cannot write
//!   (a log shipper that died, a closed pipe) instead of failing or panicking.

use std::io::Write;

/// Untrusted text for a terminal: control, format and separator characters escaped.
pub use lienthong_proto::agency::escape_for_display as escape;

/// `println!` for command output: a closed stdout ends the process quietly.
macro_rules! outln {
    () => {
        $crate::output::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use outln;

/// `eprintln!` for messages to a person: a stderr that cannot take them is ignored.
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::output::write_stderr(format_args!($($arg)*))
    };
}
pub(crate) use errln;

/// Writes to stdout. When the reader has gone (broken pipe) the command's output has
/// no one to go to, so the process exits at once with status 0 and says nothing; any
/// other write failure (a full disk behind a redirect) exits with status 1 and a
/// message on stderr, if stderr still takes one.
pub(crate) fn write_stdout(args: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    let written = stdout.write_fmt(args).and_then(|()| stdout.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "lienthong: cannot write the output: {e}");
            std::process::exit(1);
        }
    }
}

/// A line for stderr that is dropped when stderr cannot take it.
pub(crate) fn write_stderr(args: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "{args}");
}

/// The tracing writer: stderr, ignoring every write error. `io::stderr()` is
/// unbuffered, so a dropped event is never half-written into the next one.
#[derive(Debug, Clone, Copy, Default)]
pub struct QuietStderr;

impl Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // A dead stderr must not become a failure in whatever task logged: the event
        // is lost, the work goes on.
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for QuietStderr {
    type Writer = QuietStderr;

    fn make_writer(&'a self) -> Self::Writer {
        QuietStderr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_leaves_plain_text_and_escapes_what_hides() {
        assert_eq!(escape("Công văn số 12/UBND"), "Công văn số 12/UBND");
        assert_eq!(
            escape("a\r\nSENDER 000.00.00.H31"),
            "a\\u{000D}\\u{000A}SENDER 000.00.00.H31"
        );
        assert_eq!(escape("evil\u{202e}gnp.exe"), "evil\\u{202E}gnp.exe");
        assert_eq!(
            escape("x\u{200b}y\u{feff}\u{2066}"),
            "x\\u{200B}y\\u{FEFF}\\u{2066}"
        );
        assert_eq!(escape("\u{1b}[2J"), "\\u{001B}[2J");
    }
}
