//! Logging: `tracing` to stderr or a file, as text or JSON; the file is reopened on SIGUSR1 so
//! logrotate can move it away.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

static LOG_FILE: OnceLock<(PathBuf, Mutex<File>)> = OnceLock::new();

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Installs the global subscriber. `RUST_LOG` refines the level (default `info`).
pub fn init(format: LogFormat, file: Option<&Path>) -> io::Result<()> {
    if let Some(path) = file {
        let f = open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("log file {}: {e}", path.display())))?;
        let _ = LOG_FILE.set((path.to_path_buf(), Mutex::new(f)));
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, never in files or pipes.
    let ansi = file.is_none() && std::io::IsTerminal::is_terminal(&io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Target)
        .with_ansi(ansi);
    let result = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    // A second init (tests, embedding) keeps the first subscriber.
    let _ = result;
    Ok(())
}

/// Reopens the log file at its path (after logrotate moved it); stderr needs nothing.
pub fn reopen() {
    let Some((path, file)) = LOG_FILE.get() else {
        return;
    };
    match open(path) {
        Ok(new) => {
            if let Ok(mut f) = file.lock() {
                *f = new;
            }
            tracing::info!(path = %path.display(), "log file reopened");
        }
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot reopen log file; still writing the old one")
        }
    }
}

/// Where log lines go: the reopenable file if there is one, else stderr.
#[derive(Clone, Copy)]
struct Target;

/// One log line's writer.
enum LineWriter {
    Stderr(io::Stderr),
    File(&'static Mutex<File>),
}

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            LineWriter::Stderr(e) => e.write(buf),
            LineWriter::File(f) => match f.lock() {
                Ok(mut f) => f.write(buf),
                Err(_) => Ok(buf.len()),
            },
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            LineWriter::Stderr(e) => e.flush(),
            LineWriter::File(_) => Ok(()),
        }
    }
}

impl<'a> MakeWriter<'a> for Target {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        match LOG_FILE.get() {
            Some((_, f)) => LineWriter::File(f),
            None => LineWriter::Stderr(io::stderr()),
        }
    }
}

/// Where a panic happened (`file:line`) and its message, for the one log line a panic hook
/// writes (workers and task processes alike).
pub(crate) fn panic_parts(info: &std::panic::PanicHookInfo<'_>) -> (String, String) {
    let location = info
        .location()
        .map(|l| format!("{}:{}", l.file(), l.line()))
        .unwrap_or_default();
    let payload = info.payload();
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    (location, message)
}
