//! Real nginx on loopback, configured by the project's own `nginx/nginx.sh` so the tests run
//! the shipped configuration.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::{free_port, repo_root, Proc, TempDir};

/// A running nginx in front of an upstream, stopped when dropped.
pub struct Nginx {
    proc: Proc,
    port: u16,
}

impl Nginx {
    /// Renders the shipped config for `upstream` (`unix:/path` or `127.0.0.1:9000`) into
    /// `dir/nginx-N` and starts nginx on a free loopback port.
    pub fn start(dir: &TempDir, upstream: &str, keep_conn: bool) -> Nginx {
        Nginx::start_with_root(dir, upstream, keep_conn, &repo_root().join("nginx/public"))
    }

    /// As [`Nginx::start`], with `root` as the document root (what `SCRIPT_FILENAME` points
    /// into: the scripts a PHP or CGI program runs).
    pub fn start_with_root(dir: &TempDir, upstream: &str, keep_conn: bool, root: &Path) -> Nginx {
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
                return Nginx { proc, port };
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

    /// What nginx logged to its error log so far.
    pub fn log(&self) -> String {
        self.proc.stderr_text()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.proc.signal(Signal::SIGQUIT);
        if self.proc.wait_timeout(Duration::from_secs(5)).is_none() {
            eprintln!("nginx did not stop on QUIT; killing its process group");
        }
    }
}
