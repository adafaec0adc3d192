//! `<binary> status`: prints the pool's status page from a running server, so an operator
//! needs no `cgi-fcgi` tricks. It speaks FastCGI to the listener itself (blocking std sockets
//! and the `fcgi` crate's sans-IO client: this is a fresh, short-lived process with no runtime)
//! and asks for the configured status path. Exit codes: 0 with the page, 1 when nothing
//! answers or the answer is not the page, 2 for bad arguments.

use std::ffi::OsString;
use std::fmt;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use bytes::BytesMut;
use clap::Parser;
use fcgi::client::{self, Response};
use fcgi::{Params, Role};

use crate::config::{self, ListenAddr};

/// The path asked for when neither `--status-path` nor the file's `status_path` says: the one
/// PHP-FPM's shipped `www.conf` suggests, and the README's.
pub const DEFAULT_STATUS_PATH: &str = "/status";

/// Connecting, sending and each read: the page is built from the scoreboard without the
/// application, even while every worker is busy, so a server that takes longer is not
/// answering; generous for a loaded machine.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Largest answer read: a `full` page of thousands of workers fits many times over.
const MAX_ANSWER: usize = 64 << 20;

const EXIT_NO_ANSWER: i32 = 1;
const EXIT_BAD_ARGS: i32 = 2;

/// `status`'s arguments.
#[derive(Debug, Parser)]
#[command(about = "Print the pool's status page from a running server")]
struct StatusArgs {
    /// The server's listener: `unix:/path`, `127.0.0.1:9000` [default: the first `listen` of
    /// --config].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// The server's TOML configuration: its `listen` and `status_path`.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The status page's path [default: the file's status_path, else /status].
    #[arg(long, value_name = "PATH")]
    status_path: Option<String>,
    /// One entry per worker.
    #[arg(long)]
    full: bool,
    /// As JSON.
    #[arg(long, conflicts_with = "openmetrics")]
    json: bool,
    /// As OpenMetrics.
    #[arg(long)]
    openmetrics: bool,
}

/// Where to ask, and what.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    addr: ListenAddr,
    path: String,
    query: String,
}

/// Why there is no page.
#[derive(Debug)]
enum Failure {
    /// The arguments or the file do not say where to ask.
    Args(String),
    /// Nothing answered, or not with the page.
    NoAnswer(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Args(m) | Failure::NoAnswer(m) => f.write_str(m),
        }
    }
}

/// Runs `status` with `args` (the words after it) and returns the exit code.
pub(crate) fn run(program: &str, args: impl Iterator<Item = OsString>) -> i32 {
    let words = std::iter::once(OsString::from(format!("{program} status"))).chain(args);
    let parsed = match StatusArgs::try_parse_from(words) {
        Ok(parsed) => parsed,
        Err(e) => {
            // clap's own message; --help is not an error.
            let _ = e.print();
            return if e.use_stderr() { EXIT_BAD_ARGS } else { 0 };
        }
    };
    let result = target(&parsed).and_then(|t| fetch(&t).map(|page| (t, page)));
    match result {
        Ok((_, page)) => {
            let mut out = std::io::stdout().lock();
            if out
                .write_all(page.body())
                .and_then(|()| out.flush())
                .is_err()
            {
                return EXIT_NO_ANSWER;
            }
            0
        }
        Err(e) => {
            eprintln!("{program} status: {e}");
            match e {
                Failure::Args(_) => EXIT_BAD_ARGS,
                Failure::NoAnswer(_) => EXIT_NO_ANSWER,
            }
        }
    }
}

/// The address and path from the flags, else from the file.
fn target(args: &StatusArgs) -> Result<Target, Failure> {
    let file = match &args.config {
        Some(path) => Some(config::read_file(path).map_err(|e| Failure::Args(e.to_string()))?),
        None => None,
    };
    let listen = match (&args.listen, &file) {
        (Some(addr), _) => addr.clone(),
        (None, Some(file)) => file.listen.first().cloned().ok_or_else(|| {
            Failure::Args("the config file has no listen address: give --listen ADDR".into())
        })?,
        (None, None) => {
            return Err(Failure::Args(
                "where is the server? give --listen ADDR or --config FILE".into(),
            ))
        }
    };
    let addr = listen
        .parse::<ListenAddr>()
        .map_err(|e| Failure::Args(format!("invalid address \"{listen}\": {e}")))?;
    let path = args
        .status_path
        .clone()
        .or_else(|| file.and_then(|f| f.status_path))
        .unwrap_or_else(|| DEFAULT_STATUS_PATH.to_string());
    if !path.starts_with('/') {
        return Err(Failure::Args(format!(
            "invalid status path \"{path}\": expected a path starting with /, like /status"
        )));
    }
    let mut words = Vec::new();
    if args.json {
        words.push("json");
    }
    if args.openmetrics {
        words.push("openmetrics");
    }
    if args.full {
        words.push("full");
    }
    Ok(Target {
        addr,
        path,
        query: words.join("&"),
    })
}

/// Asks `target` for its page: the answer when it is a 200.
fn fetch(target: &Target) -> Result<Response, Failure> {
    let at = match &target.addr {
        ListenAddr::Unix(p) => p.display().to_string(),
        ListenAddr::Tcp(a) => a.to_string(),
    };
    let no_answer = |what: &str, e: &dyn fmt::Display| {
        Failure::NoAnswer(format!("no answer from {at}: {what}: {e}"))
    };
    let mut stream: Box<dyn ReadWrite> = match &target.addr {
        ListenAddr::Unix(path) => {
            let s = UnixStream::connect(path).map_err(|e| no_answer("cannot connect", &e))?;
            s.set_read_timeout(Some(TIMEOUT))
                .and_then(|()| s.set_write_timeout(Some(TIMEOUT)))
                .map_err(|e| no_answer("cannot set a timeout", &e))?;
            Box::new(s)
        }
        ListenAddr::Tcp(addr) => {
            let s = TcpStream::connect_timeout(addr, TIMEOUT)
                .map_err(|e| no_answer("cannot connect", &e))?;
            s.set_read_timeout(Some(TIMEOUT))
                .and_then(|()| s.set_write_timeout(Some(TIMEOUT)))
                .map_err(|e| no_answer("cannot set a timeout", &e))?;
            Box::new(s)
        }
    };
    let uri = if target.query.is_empty() {
        target.path.clone()
    } else {
        format!("{}?{}", target.path, target.query)
    };
    let params = Params::from_pairs([
        ("GATEWAY_INTERFACE", "CGI/1.1"),
        ("REQUEST_METHOD", "GET"),
        ("SCRIPT_NAME", target.path.as_str()),
        ("DOCUMENT_URI", target.path.as_str()),
        ("REQUEST_URI", uri.as_str()),
        ("QUERY_STRING", target.query.as_str()),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("REMOTE_ADDR", "127.0.0.1"),
    ]);
    let mut wire = BytesMut::new();
    client::encode_request(1, Role::Responder, false, &params, b"", &mut wire);
    stream
        .write_all(&wire)
        .map_err(|e| no_answer("cannot send the request", &e))?;
    let mut response = Response::default();
    let mut input = BytesMut::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .map_err(|e| no_answer("reading the answer", &e))?;
        if n == 0 {
            return Err(Failure::NoAnswer(format!(
                "no answer from {at}: the connection closed before the answer ended"
            )));
        }
        input.extend_from_slice(&chunk[..n]);
        if input.len() + response.stdout.len() > MAX_ANSWER {
            return Err(Failure::NoAnswer(format!(
                "{at} answered more than {MAX_ANSWER} bytes; that is not a status page"
            )));
        }
        match client::read_response(&mut input, 1, &mut response) {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return Err(no_answer("not FastCGI", &e)),
        }
    }
    match response.status() {
        200 => Ok(response),
        status => {
            let body = String::from_utf8_lossy(response.body());
            let first = body.lines().next().unwrap_or("").trim();
            Err(Failure::NoAnswer(format!(
                "{at} answered {uri} with status {status} ({first:?}), not the status page: \
                 is its status_path {}?",
                target.path
            )))
        }
    }
}

/// A connected stream of either kind.
trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> StatusArgs {
        StatusArgs::try_parse_from(std::iter::once("app status").chain(words.iter().copied()))
            .expect("valid arguments")
    }

    #[test]
    fn the_target_comes_from_the_flags_else_the_file() {
        let t = target(&args(&["--listen", "127.0.0.1:9000", "--json", "--full"])).expect("ok");
        assert_eq!(
            t.addr,
            ListenAddr::Tcp("127.0.0.1:9000".parse().expect("addr"))
        );
        assert_eq!(
            (t.path.as_str(), t.query.as_str()),
            ("/status", "json&full")
        );

        let dir = std::env::temp_dir().join(format!("status-command-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("app.toml");
        std::fs::write(
            &file,
            "listen = [\"unix:/run/a.sock\", \"127.0.0.1:1\"]\nstatus_path = \"/fpm\"\n",
        )
        .expect("write");
        let conf = file.to_str().expect("utf-8");
        let t = target(&args(&["--config", conf, "--openmetrics"])).expect("ok");
        assert_eq!(t.addr, ListenAddr::Unix("/run/a.sock".into()));
        assert_eq!((t.path.as_str(), t.query.as_str()), ("/fpm", "openmetrics"));
        let t = target(&args(&["--config", conf, "--status-path", "/s"])).expect("ok");
        assert_eq!(t.path, "/s");
        let _ = std::fs::remove_dir_all(dir);

        for bad in [&[][..], &["--listen", "nowhere"], &["--status-path", "s"]] {
            let e = target(&args(bad)).expect_err("no target");
            assert!(matches!(e, Failure::Args(_)), "{bad:?}: {e}");
        }
        assert!(StatusArgs::try_parse_from(["app status", "--json", "--openmetrics"]).is_err());
    }

    #[test]
    fn nothing_listening_names_the_address_and_the_cause() {
        let path = std::env::temp_dir().join(format!("status-none-{}.sock", std::process::id()));
        let t = Target {
            addr: ListenAddr::Unix(path.clone()),
            path: "/status".into(),
            query: String::new(),
        };
        let e = fetch(&t).expect_err("nothing listens");
        let msg = e.to_string();
        assert!(
            matches!(e, Failure::NoAnswer(_))
                && msg.contains(&path.display().to_string())
                && msg.contains("cannot connect"),
            "{msg}"
        );
    }

    #[test]
    fn a_server_that_closes_early_or_answers_another_page_is_no_answer() {
        use std::os::unix::net::UnixListener;
        let path = std::env::temp_dir().join(format!("status-fake-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind");
        let server = std::thread::spawn(move || {
            // First: read the request, close without a word. Second: a 404 page.
            let mut buf = [0u8; 4096];
            let (mut conn, _) = listener.accept().expect("accept");
            let _ = conn.read(&mut buf);
            drop(conn);
            let (mut conn, _) = listener.accept().expect("accept");
            let _ = conn.read(&mut buf);
            let mut out = BytesMut::new();
            fcgi::record::encode_stream(
                fcgi::record::kind::STDOUT,
                1,
                b"Status: 404 Not Found\r\n\r\nno such page\n",
                &mut out,
            );
            fcgi::record::encode_end_request(1, 0, fcgi::ProtocolStatus::RequestComplete, &mut out);
            conn.write_all(&out).expect("answer");
        });
        let t = Target {
            addr: ListenAddr::Unix(path.clone()),
            path: "/status".into(),
            query: String::new(),
        };
        let closed = fetch(&t).expect_err("closed").to_string();
        assert!(
            closed.contains("closed before the answer ended"),
            "{closed}"
        );
        let other = fetch(&t).expect_err("a 404").to_string();
        assert!(
            other.contains("status 404") && other.contains("no such page"),
            "{other}"
        );
        server.join().expect("server thread");
        let _ = std::fs::remove_file(path);
    }
}
