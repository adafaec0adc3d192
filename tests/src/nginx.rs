//! Real nginx on loopback, configured by the project's own `nginx/nginx.sh` so the tests run
//! the shipped configuration.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::{free_port, repo_root, Proc, TempDir};

/// A running nginx in front of an upstream, stopped when dropped.
pub struct Nginx {
    proc: Proc,
    port: u16,
    prefix: PathBuf,
}

impl Nginx {
    /// Renders the shipped config for `upstream` (`unix:/path` or `127.0.0.1:9000`) into
    /// `dir/nginx-N` and starts nginx on a free loopback port.
    pub fn start(dir: &TempDir, upstream: &str, keep_conn: bool) -> Nginx {
        Nginx::start_with_log_format(dir, upstream, keep_conn, None)
    }

    /// As [`Nginx::start`], with the access log written in `log_format` (nginx's
    /// `log_format` syntax, e.g. `"$request_uri $upstream_response_time"`) when given.
    pub fn start_with_log_format(
        dir: &TempDir,
        upstream: &str,
        keep_conn: bool,
        log_format: Option<&str>,
    ) -> Nginx {
        let root = repo_root().join("nginx/public");
        Nginx::start_full(dir, upstream, keep_conn, &root, log_format)
    }

    /// As [`Nginx::start`], with `root` as the document root (what `SCRIPT_FILENAME` points
    /// into: the scripts a PHP or CGI program runs).
    pub fn start_with_root(dir: &TempDir, upstream: &str, keep_conn: bool, root: &Path) -> Nginx {
        Nginx::start_full(dir, upstream, keep_conn, root, None)
    }

    fn start_full(
        dir: &TempDir,
        upstream: &str,
        keep_conn: bool,
        root: &Path,
        log_format: Option<&str>,
    ) -> Nginx {
        let script = repo_root().join("nginx/nginx.sh");
        for attempt in 0..5 {
            let prefix = dir.path().join(format!("nginx-{attempt}"));
            let port = free_port();
            let rendered = Command::new(&script)
                .arg("render")
                .arg(&prefix)
                .args([
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                    "--upstream",
                    upstream,
                ])
                .args(["--keep-conn", if keep_conn { "on" } else { "off" }])
                .arg("--root")
                .arg(root)
                .output()
                .expect("run nginx/nginx.sh (is nginx installed? scripts/install-deps)");
            assert!(
                rendered.status.success(),
                "nginx.sh render: {}",
                String::from_utf8_lossy(&rendered.stderr)
            );
            if let Some(format) = log_format {
                use_log_format(&prefix, format);
            }
            let mut cmd = Command::new(&script);
            cmd.arg("start").arg(&prefix);
            let proc = Proc::spawn(dir, &format!("nginx-{attempt}"), cmd);
            let up = (0..500).any(|_| {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(10));
                proc.wait_timeout(Duration::ZERO).is_none()
                    && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            if up {
                return Nginx { proc, port, prefix };
            }
            // Lost the port to someone else, most likely: try another.
            eprintln!("nginx did not start on {port}: {}", proc.stderr_text());
        }
        panic!("nginx did not start after 5 attempts");
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// What nginx wrote to its access log so far, one line per request.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.prefix.join("access.log")).unwrap_or_default()
    }

    /// What nginx logged to its error log so far.
    pub fn log(&self) -> String {
        self.proc.stderr_text()
    }
}

/// Rewrites the rendered config's access log line to use `format`.
fn use_log_format(prefix: &std::path::Path, format: &str) {
    let path = prefix.join("nginx.conf");
    let conf = std::fs::read_to_string(&path).expect("read the rendered nginx.conf");
    let mut found = false;
    let conf: Vec<String> = conf
        .lines()
        .map(|l| match l.trim().strip_suffix("/access.log;") {
            Some(rest) if rest.starts_with("access_log ") => {
                found = true;
                format!("    log_format e2e '{format}';\n    {rest}/access.log e2e;")
            }
            _ => l.to_string(),
        })
        .collect();
    assert!(found, "the rendered nginx.conf has an access_log line");
    std::fs::write(&path, conf.join("\n") + "\n").expect("write nginx.conf");
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.proc.signal(Signal::SIGQUIT);
        if self.proc.wait_timeout(Duration::from_secs(5)).is_none() {
            eprintln!("nginx did not stop on QUIT; killing its process group");
        }
    }
}
