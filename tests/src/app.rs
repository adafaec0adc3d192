//! Starting the example application as the operator would, and talking FastCGI to it.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use fcgi::client::Response;
use fcgi::io::Client;
use fcgi::Params;
use nix::sys::signal::Signal;

use crate::log::{wait_for_json_line, LOG_DEADLINE};
use crate::{bin_path, free_port, http, wait_until, Nginx, Proc, TempDir};

/// How long a pool may take to reach a size: a fork, the worker's setup and its first accept
/// each take milliseconds, but a loaded machine with two cores can stretch that a long way.
pub const WORKERS_DEADLINE: Duration = Duration::from_secs(10);

/// Where a test reaches the application.
#[derive(Debug, Clone)]
pub enum Addr {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(String),
}

/// A running `app-example` master listening on a unix socket and a TCP port.
pub struct App {
    proc: Proc,
    unix: PathBuf,
    port: u16,
}

impl App {
    /// Starts `app-example` with `args` after its two listeners, and waits until both accept.
    pub fn start(dir: &TempDir, args: &[&str]) -> App {
        App::start_with_env(dir, args, &[])
    }

    /// As [`App::start`], with extra environment variables.
    pub fn start_with_env(dir: &TempDir, args: &[&str], env: &[(&str, &str)]) -> App {
        App::start_binary(dir, &bin_path("app-example"), args, env)
    }

    /// Starts an already-prepared command whose listeners are `unix` (and no TCP port), and
    /// waits until the master runs. The command's last arguments must reach the server (a
    /// launcher passes them on): `--allow-root` may be appended.
    pub fn start_command(dir: &TempDir, cmd: Command, unix: PathBuf) -> App {
        App::start_command_running(dir, cmd, unix, &[])
    }

    /// As [`App::start_command`], for `fcgi-pool`: `program` goes after the opt-in and `--`.
    pub fn start_command_running(
        dir: &TempDir,
        mut cmd: Command,
        unix: PathBuf,
        program: &[&str],
    ) -> App {
        opt_in_if_root(&mut cmd);
        if !program.is_empty() {
            cmd.arg("--").args(program);
        }
        let app = App {
            proc: Proc::spawn(dir, "app", cmd),
            unix,
            port: 0,
        };
        app.wait_for_log("master started");
        app
    }

    /// As [`App::start_with_env`], running the binary at `program`.
    pub fn start_binary(dir: &TempDir, program: &Path, args: &[&str], env: &[(&str, &str)]) -> App {
        let unix = dir.path().join("app.sock");
        let port = free_port();
        let mut cmd = Command::new(program);
        cmd.arg("--listen")
            .arg(format!("unix:{}", unix.display()))
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"));
        // Before `args`: they may end with `-- program args`, which are not the server's.
        opt_in_if_root(&mut cmd);
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let proc = Proc::spawn(dir, "app", cmd);
        let app = App { proc, unix, port };
        // Listening starts before setup and the first fork; the log says when the master runs.
        // (A probe connection would itself make a dynamic or ondemand pool spawn.)
        let fails = env.iter().any(|(k, _)| *k == "APP_EXAMPLE_FAIL_SETUP");
        if !fails {
            app.wait_for_log("master started");
        }
        app
    }

    /// Runs `app-example` with `args` to completion: its exit code and stderr + stdout.
    pub fn run_to_exit(dir: &TempDir, args: &[&str]) -> (Option<i32>, String) {
        let mut cmd = Command::new(bin_path("app-example"));
        cmd.args(args).current_dir(dir.path());
        // The status command has no such flag, and never starts workers.
        if args.first() != Some(&"status") {
            opt_in_if_root(&mut cmd);
        }
        let out = cmd.output().expect("run app-example");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        (out.status.code(), text)
    }

    /// The master's pid.
    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    /// The unix listener.
    pub fn unix(&self) -> Addr {
        Addr::Unix(self.unix.clone())
    }

    /// The unix socket's path.
    pub fn unix_path(&self) -> &Path {
        &self.unix
    }

    /// The TCP listener.
    pub fn tcp(&self) -> Addr {
        Addr::Tcp(format!("127.0.0.1:{}", self.port))
    }

    /// Sends `sig` to the master.
    pub fn signal(&self, sig: Signal) {
        self.proc.signal(sig);
    }

    /// Waits for the master to exit.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        self.proc.wait_timeout(timeout)
    }

    /// Everything the master and its workers logged so far.
    pub fn stderr(&self) -> String {
        self.proc.stderr_text()
    }

    /// Waits up to [`WORKERS_DEADLINE`] until the master has exactly `n` live workers.
    pub fn wait_for_workers(&self, n: usize) {
        self.wait_for_workers_within(n, WORKERS_DEADLINE);
    }

    /// Waits up to `within` until the master has exactly `n` live workers; the panic names
    /// the workers it saw last.
    pub fn wait_for_workers_within(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let last = worker_pids(self.pid());
            if last.len() == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {within:?} waiting for {n} workers; the last seen: {last:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to [`LOG_DEADLINE`] until the log holds `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        wait_until(LOG_DEADLINE, needle, || self.stderr().contains(needle));
    }

    /// Waits up to [`LOG_DEADLINE`] for the JSON log line (`--log-format json`) whose
    /// `message` is `message`, and returns it.
    pub fn wait_for_json_line(&self, message: &str) -> serde_json::Value {
        wait_for_json_line(|| self.stderr(), message)
    }
}

/// Run as root, the server refuses workers that stay root unless told `--allow-root`. The
/// tests about something else run the server as whoever runs them, so they opt in here, in
/// one place; `hardening.rs` starts its servers itself to test the refusal and `user`.
pub fn opt_in_if_root(cmd: &mut Command) {
    if nix::unistd::geteuid().is_root() {
        cmd.arg("--allow-root");
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- app log ---\n{}--- end of app log ---", self.stderr());
        }
    }
}

/// One Responder request, `FCGI_KEEP_CONN` off, on a fresh connection.
pub fn fcgi_request(addr: &Addr, method: &str, uri: &str, body: &[u8]) -> Result<Response, String> {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let params = Params::from_pairs([
        ("REQUEST_METHOD", method.to_string()),
        ("REQUEST_URI", uri.to_string()),
        ("SCRIPT_NAME", path.to_string()),
        ("DOCUMENT_URI", path.to_string()),
        ("QUERY_STRING", query.to_string()),
        ("CONTENT_LENGTH", body.len().to_string()),
        ("SERVER_PROTOCOL", "HTTP/1.1".to_string()),
    ]);
    fcgi_request_with(addr, &params, body)
}

/// One request with the given params, on a fresh connection.
pub fn fcgi_request_with(addr: &Addr, params: &Params, body: &[u8]) -> Result<Response, String> {
    fcgi_request_as(addr, fcgi::Role::Responder, params, body, None)
}

/// One request in any role (a Filter's DATA stream in `data`), on a fresh connection.
pub fn fcgi_request_as(
    addr: &Addr,
    role: fcgi::Role,
    params: &Params,
    body: &[u8],
    data: Option<&[u8]>,
) -> Result<Response, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let work = async {
            match addr {
                Addr::Unix(p) => {
                    let mut c = Client::connect_unix(p).await.map_err(|e| e.to_string())?;
                    c.request_with(role, false, params, body, data)
                        .await
                        .map_err(|e| e.to_string())
                }
                Addr::Tcp(a) => {
                    let mut c = Client::connect_tcp(a.as_str())
                        .await
                        .map_err(|e| e.to_string())?;
                    c.request_with(role, false, params, body, data)
                        .await
                        .map_err(|e| e.to_string())
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), work)
            .await
            .map_err(|_| "no response within 60 s".to_string())?
    })
}

/// Where a test asks for `/pid`.
#[derive(Clone, Copy)]
pub enum Via<'a> {
    /// Straight to the application, over FastCGI.
    Fcgi(&'a Addr),
    /// Through nginx, over HTTP.
    Nginx(&'a Nginx),
}

/// GET `/pid`: the pid of the worker that answered, or why there is none (no answer, a status
/// other than 200, or a body that is not a pid).
pub fn fetch_pid(via: Via<'_>) -> Result<i32, String> {
    let (status, body) = match via {
        Via::Fcgi(addr) => {
            let r = fcgi_request(addr, "GET", "/pid", b"")?;
            (r.status(), r.body().to_vec())
        }
        Via::Nginx(nginx) => {
            let r = http::get(nginx.port(), "/pid").map_err(|e| e.to_string())?;
            (r.status, r.body)
        }
    };
    let text = String::from_utf8_lossy(&body);
    match text.trim().parse() {
        Ok(pid) if status == 200 => Ok(pid),
        _ => {
            let via = match via {
                Via::Fcgi(addr) => format!("FastCGI to {addr:?}"),
                Via::Nginx(nginx) => format!("nginx on port {}", nginx.port()),
            };
            Err(format!(
                "GET /pid via {via} answered {status} {text:?}, expected 200 and a pid"
            ))
        }
    }
}

/// The scheduling policy of a process (field 41 of /proc/PID/stat): 0 `SCHED_OTHER`, 3
/// `SCHED_BATCH`.
pub fn sched_policy(pid: i32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // The command name, in parentheses, may hold spaces: fields are counted after it.
    let (_, rest) = stat.rsplit_once(')').expect("a (comm) field");
    rest.split_whitespace()
        .nth(41 - 3)
        .and_then(|f| f.parse().ok())
        .unwrap_or_else(|| panic!("a policy field in {stat}"))
}

/// The live (not zombie) children of `master`, from /proc.
pub fn worker_pids(master: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // Fields after the command name: state, ppid, ...
            let Some(rest) = stat.rsplit(')').next() else {
                return false;
            };
            let mut fields = rest.split_whitespace();
            let state = fields.next();
            let ppid = fields.next().and_then(|p| p.parse::<i32>().ok());
            ppid == Some(master) && state != Some("Z")
        })
        .collect()
}
