//! A real PostgreSQL server for the background-task tests, from Debian's packages, started in a
//! temporary directory on 127.0.0.1 and a free port (as the `postgres` user when running as
//! root, since PostgreSQL refuses root), and stopped by pid when dropped; plus a small TCP proxy
//! that can stop forwarding, to black-hole one client's connection.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::{Uid, User};

use crate::{free_port, wait_until, Proc, TempDir};

/// How long a fresh server may take to accept connections on a loaded machine.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// How long a fast shutdown may take before the server's group is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// A PostgreSQL binary: Debian keeps them in /usr/lib/postgresql/VERSION/bin, off PATH.
fn binary(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    versions.sort();
    versions
        .iter()
        .rev()
        .map(|v| v.join("bin").join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// `program` as the postgres user when we are root (setpriv execs it: same pid).
fn command(program: &Path) -> Command {
    if Uid::effective().is_root() {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// A running server.
pub struct Postgres {
    proc: Proc,
    port: u16,
}

impl Postgres {
    /// initdb into `dir`/pg and start the server on 127.0.0.1.
    pub fn start(dir: &TempDir) -> Postgres {
        let root = dir.path().join("pg");
        std::fs::create_dir_all(&root).expect("pg dir");
        if Uid::effective().is_root() {
            let user = User::from_name("postgres")
                .expect("passwd")
                .expect("a postgres user (scripts/install-deps installs postgresql)");
            for path in [dir.path(), root.as_path()] {
                nix::unistd::chown(path, Some(user.uid), Some(user.gid)).expect("chown pg dir");
            }
        }
        let data = root.join("data");
        let out = command(&binary("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let mut cmd = command(&binary("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(&root)
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=40"]);
        let pg = Postgres {
            proc: Proc::spawn(dir, "postgres", cmd),
            port,
        };
        wait_until(START_DEADLINE, "postgres to accept connections", || {
            assert!(
                pg.proc.wait_timeout(Duration::ZERO).is_none(),
                "postgres exited: {}",
                pg.proc.stderr_text()
            );
            postgres::Client::connect(&pg.url(), postgres::NoTls).is_ok()
        });
        pg
    }

    /// Its TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection string for a client on `port` (this server's, or a proxy's before it).
    pub fn url_via(&self, port: u16) -> String {
        format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=5")
    }

    /// A connection string for this server.
    pub fn url(&self) -> String {
        self.url_via(self.port)
    }

    /// A new connection.
    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url(), postgres::NoTls).expect("connect to postgres")
    }

    /// The server's log.
    pub fn log(&self) -> String {
        self.proc.stderr_text()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Fast shutdown (SIGINT): sessions end, the postmaster exits; the Proc then kills
        // whatever is left of its group.
        self.proc.signal(Signal::SIGINT);
        let _ = self.proc.wait_timeout(STOP_DEADLINE);
    }
}

/// A TCP proxy to a local port that forwards until told to go silent, then holds every
/// connection open without passing a byte either way: a network that black-holes packets.
pub struct Blackhole {
    port: u16,
    silent: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

/// How often the proxy's threads look at their flags.
const PROXY_POLL: Duration = Duration::from_millis(20);

impl Blackhole {
    /// A proxy on a free 127.0.0.1 port to 127.0.0.1:`target`.
    pub fn start(target: u16) -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let silent = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (Arc::clone(&silent), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                            continue;
                        };
                        let _ = client.set_nonblocking(false);
                        pump(&client, &server, &s, &st);
                        pump(&server, &client, &s, &st);
                    }
                    Err(_) => std::thread::sleep(PROXY_POLL),
                }
            }
        });
        Blackhole { port, silent, stop }
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// From now on nothing passes, and nothing is closed.
    pub fn go_silent(&self) {
        self.silent.store(true, Ordering::Relaxed);
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One direction of a proxied connection, on its own thread, until stopped or closed.
fn pump(from: &TcpStream, to: &TcpStream, silent: &Arc<AtomicBool>, stop: &Arc<AtomicBool>) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    let (silent, stop) = (Arc::clone(silent), Arc::clone(stop));
    let _ = from.set_read_timeout(Some(PROXY_POLL));
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        while !stop.load(Ordering::Relaxed) {
            if silent.load(Ordering::Relaxed) {
                std::thread::sleep(PROXY_POLL);
                continue;
            }
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
    });
}
