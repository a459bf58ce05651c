//! Writing to stdout and stderr without panicking (`println!` panics when stdout is a closed
//! pipe): a closed stdout (`sluice runs | head -1`) ends a command quietly with exit 0.

use std::io::{self, Write};

use super::{EXIT_OK, EXIT_USAGE};

/// `sluice: …` on stderr. A failure to write there is ignored: there is nowhere left to report
/// it.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "sluice: {}", format_args!($($arg)*));
    }};
}
pub(crate) use say;

/// Whether a write failed because the reader of stdout went away.
pub fn closed(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::BrokenPipe
}

/// The exit code after stdout failed: 0 quietly when its reader went away, else 2 with the
/// error on stderr.
pub fn failed(e: &io::Error) -> u8 {
    if closed(e) {
        EXIT_OK
    } else {
        say!("cannot write the output: {e}");
        EXIT_USAGE
    }
}

/// Writes `text` and a newline to stdout; `Err` holds the exit code when that failed.
pub fn line(text: &str) -> Result<(), u8> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
        .map_err(|e| failed(&e))
}

/// Writes a serialised JSON value as one line on stdout.
pub fn json_line(json: serde_json::Result<String>) -> Result<(), u8> {
    match json {
        Ok(text) => line(&text),
        Err(e) => {
            say!("cannot encode the output as JSON: {e}");
            Err(EXIT_USAGE)
        }
    }
}
