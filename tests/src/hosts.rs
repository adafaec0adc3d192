//! The hosts rig: several real hosts on one machine, each a network namespace with a veth pair
//! to the root namespace and one master of `app-example` listening on the namespace's own
//! address, and real nginx in the root namespace with an `upstream` of them, rendered from the
//! shipped `nginx/upstream-hosts.conf.in`. Used by `tests/tests/hosts.rs`; the README's
//! "Several hosts" section points here.
//!
//! It needs root (namespaces and links) and says so. It touches only what it made: namespaces
//! and links named after the test's pid and a counter, addresses from link-local
//! 169.254.0.0/16 (never routed off a link, so they cannot collide with a real network here),
//! and removes all of them when dropped, on a failed test too: the hosts' process groups are
//! killed, the namespaces deleted (which deletes their veth pairs), and the root ends deleted
//! in case a namespace was already gone.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::{bin_path, free_port, repo_root, wait_until, Proc, TempDir};

/// The port every host's master listens on, inside its own namespace.
pub const HOST_PORT: u16 = 9000;

/// How long a host's master may take to listen and start its workers on a loaded machine.
const HOST_START: Duration = Duration::from_secs(15);

/// The nginx settings a rig's upstream is rendered with.
#[derive(Debug, Clone)]
pub struct Frontend {
    /// `fastcgi_connect_timeout`.
    pub connect_timeout: &'static str,
    /// `fastcgi_read_timeout` and `fastcgi_send_timeout`.
    pub read_timeout: &'static str,
    /// `fail_timeout` of every `server`.
    pub fail_timeout: &'static str,
}

impl Default for Frontend {
    fn default() -> Self {
        Frontend {
            connect_timeout: "1s",
            read_timeout: "10s",
            fail_timeout: "3s",
        }
    }
}

/// One host: a namespace, its link, its address, and its master while it runs.
pub struct Host {
    /// The namespace's name.
    pub netns: String,
    /// The veth end inside the namespace.
    pub inner: String,
    /// The veth end in the root namespace.
    pub outer: String,
    /// The master's address as nginx reaches it, `169.254.a.b:9000`.
    pub addr: String,
    ip: String,
    master: Option<Proc>,
    starts: u32,
}

impl Host {
    /// The running master's pid.
    pub fn pid(&self) -> i32 {
        self.master.as_ref().expect("the host runs").pid()
    }

    /// Sends `sig` to the master.
    pub fn signal(&self, sig: Signal) {
        self.master.as_ref().expect("the host runs").signal(sig);
    }

    /// Waits up to `timeout` for the master to exit; true if it did.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        self.master
            .as_ref()
            .is_none_or(|m| m.wait_timeout(timeout).is_some())
    }

    /// What the master and its workers logged (every start of this host).
    pub fn log(&self) -> String {
        self.master
            .as_ref()
            .map(Proc::stderr_text)
            .unwrap_or_default()
    }

    /// Kills the master's whole process group (master and workers) at once, as a host that
    /// dies would, and waits for it.
    pub fn kill_all(&mut self) {
        if let Some(m) = self.master.take() {
            drop(m);
        }
    }
}

/// The rig: hosts and the nginx in front of them, all removed when dropped.
pub struct Rig {
    dir: TempDir,
    /// The hosts, in the upstream's order.
    pub hosts: Vec<Host>,
    nginx: Option<Proc>,
    prefix: std::path::PathBuf,
    port: u16,
    app_args: Vec<String>,
}

/// Runs `ip` with `args`; panics with its stderr when it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2 is needed by the hosts rig)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl Rig {
    /// Makes `n` hosts, starts a master of `app-example` with `app_args` on each, and nginx
    /// in front with `frontend`'s timeouts. Panics, saying what is missing, without root.
    pub fn start(label: &str, n: usize, app_args: &[&str], frontend: Frontend) -> Rig {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the hosts rig needs root: it creates network namespaces and veth pairs \
             (run the e2e tests as root, or in a container with CAP_NET_ADMIN and CAP_SYS_ADMIN)"
        );
        static RIGS: AtomicU32 = AtomicU32::new(0);
        let rig_no = RIGS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let dir = TempDir::new(label);
        let mut rig = Rig {
            dir,
            hosts: Vec::new(),
            nginx: None,
            prefix: std::path::PathBuf::new(),
            port: 0,
            app_args: app_args.iter().map(|s| s.to_string()).collect(),
        };
        // 169.254.X.Y/30 per host: X from the pid so two test processes rarely meet, Y from
        // the rig and host numbers; the rig checks the address is free before taking it.
        let third = 64 + (pid % 128);
        for i in 0..n {
            let k = rig_no as usize * n + i;
            assert!(
                k < 64,
                "the hosts rig has room for 64 hosts per test process"
            );
            let base = (k * 4) as u32;
            let outer_ip = format!("169.254.{third}.{}", base + 1);
            let inner_ip = format!("169.254.{third}.{}", base + 2);
            let taken = Command::new("ip")
                .args(["-o", "addr", "show"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("{inner_ip}/")))
                .unwrap_or(false);
            assert!(!taken, "{inner_ip} is already in use on this machine");
            let netns = format!("fcgi{pid}h{k}");
            let outer = format!("fv{pid}o{k}");
            let inner = format!("fv{pid}i{k}");
            // Pushed first, so a failure below still removes what was made.
            rig.hosts.push(Host {
                netns: netns.clone(),
                inner: inner.clone(),
                outer: outer.clone(),
                addr: format!("{inner_ip}:{HOST_PORT}"),
                ip: inner_ip.clone(),
                master: None,
                starts: 0,
            });
            ip(&["netns", "add", &netns]);
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", &netns,
            ]);
            ip(&["addr", "add", &format!("{outer_ip}/30"), "dev", &outer]);
            ip(&["link", "set", &outer, "up"]);
            ip(&["-n", &netns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{inner_ip}/30"),
                "dev",
                &inner,
            ]);
            ip(&["-n", &netns, "link", "set", &inner, "up"]);
        }
        for i in 0..n {
            rig.start_host(i);
        }
        rig.start_nginx(&frontend);
        rig
    }

    /// Starts host `i`'s master (again, after a kill or a stop) and waits until it serves.
    pub fn start_host(&mut self, i: usize) {
        let host = &mut self.hosts[i];
        assert!(host.master.is_none(), "host {i} already runs");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &host.netns])
            .arg(bin_path("app-example"))
            .arg("--listen")
            .arg(&host.addr)
            .args(&self.app_args)
            .arg("--allow-root");
        host.starts += 1;
        let proc = Proc::spawn(&self.dir, &format!("host{i}-{}", host.starts), cmd);
        wait_until(
            HOST_START,
            &format!("host {i} to log 'master started'"),
            || proc.stderr_text().contains("master started"),
        );
        // Served from inside its namespace: the master and a worker are up.
        let netns = host.netns.clone();
        let addr = host.addr.clone();
        host.master = Some(proc);
        wait_until(HOST_START, &format!("host {i} to accept on {addr}"), || {
            Command::new("ip")
                .args(["netns", "exec", &netns, "bash", "-c"])
                .arg(format!(
                    "exec 3<>/dev/tcp/{}/{HOST_PORT}",
                    addr.split(':').next().unwrap_or_default()
                ))
                .status()
                .is_ok_and(|s| s.success())
        });
    }

    fn start_nginx(&mut self, frontend: &Frontend) {
        let script = repo_root().join("nginx/nginx.sh");
        let hosts = self
            .hosts
            .iter()
            .map(|h| h.addr.clone())
            .collect::<Vec<_>>()
            .join(",");
        for attempt in 0..5 {
            let prefix = self.dir.path().join(format!("nginx-{attempt}"));
            let port = free_port();
            let rendered = Command::new(&script)
                .arg("render")
                .arg(&prefix)
                .args(["--listen", &format!("127.0.0.1:{port}"), "--hosts", &hosts])
                .args(["--keep-conn", "on"])
                .args(["--connect-timeout", frontend.connect_timeout])
                .args(["--read-timeout", frontend.read_timeout])
                .args(["--fail-timeout", frontend.fail_timeout])
                .output()
                .expect("run nginx/nginx.sh");
            assert!(
                rendered.status.success(),
                "nginx.sh render: {}",
                String::from_utf8_lossy(&rendered.stderr)
            );
            let mut cmd = Command::new(&script);
            cmd.arg("start").arg(&prefix);
            let proc = Proc::spawn(&self.dir, &format!("nginx-{attempt}"), cmd);
            let up = (0..500).any(|_| {
                std::thread::sleep(Duration::from_millis(10));
                proc.wait_timeout(Duration::ZERO).is_none()
                    && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            if up {
                self.nginx = Some(proc);
                self.prefix = prefix;
                self.port = port;
                return;
            }
            eprintln!("nginx did not start on {port}: {}", proc.stderr_text());
        }
        panic!("nginx did not start after 5 attempts");
    }

    /// nginx's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// nginx's access log: `MSEC|METHOD|URI|STATUS|UPSTREAM_ADDRS|UPSTREAM_STATUSES` per request.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.prefix.join("access.log")).unwrap_or_default()
    }

    /// nginx's error log.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.prefix.join("error.log")).unwrap_or_default()
    }

    /// Sets host `i`'s link down (`up` false) or up, inside its namespace: its network is cut
    /// with its master still running.
    pub fn set_link(&self, i: usize, up: bool) {
        let h = &self.hosts[i];
        ip(&[
            "-n",
            &h.netns,
            "link",
            "set",
            &h.inner,
            if up { "up" } else { "down" },
        ]);
    }

    /// The address of host `i` without the port.
    pub fn host_ip(&self, i: usize) -> &str {
        &self.hosts[i].ip
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (i, h) in self.hosts.iter().enumerate() {
                eprintln!("--- host {i} log ---\n{}--- end ---", h.log());
            }
            eprintln!("--- nginx error log ---\n{}--- end ---", self.error_log());
        }
        if let Some(nginx) = self.nginx.take() {
            nginx.signal(Signal::SIGQUIT);
            let _ = nginx.wait_timeout(Duration::from_secs(5));
        }
        for h in &mut self.hosts {
            h.kill_all();
            let _ = Command::new("ip").args(["netns", "del", &h.netns]).output();
            // Gone with the namespace's end; deleted here in case the namespace was not made.
            let _ = Command::new("ip").args(["link", "del", &h.outer]).output();
        }
    }
}
