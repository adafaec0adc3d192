//! systemd integration without systemd: the test plays its part. A socket is passed in as fd 3
//! with LISTEN_FDS / LISTEN_PID (by a tiny Python launcher that execs the app, so the pid is
//! the app's), and the test's own datagram socket is NOTIFY_SOCKET.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::{bin_path, fcgi_request, worker_pids, App, TempDir};
use nix::sys::signal::Signal;

/// The next notification, within a few seconds.
fn next(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Notifications until one contains `what`, which it returns.
fn wait_for(sock: &UnixDatagram, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        assert!(Instant::now() < deadline, "no {what} notification");
        let msg = next(sock);
        if msg.contains(what) {
            return msg;
        }
    }
}

const LAUNCHER: &str = r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
s.listen(64)
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"#;

/// The server `server` (a binary and its flags) started by the launcher, and, for `fcgi-pool`,
/// the `program` it runs; `check` is asked to serve once it is ready and after a reload.
fn activated(name: &str, server: &[&str], program: &[&str], check: impl Fn(&App)) {
    let dir = TempDir::new(name);
    let sock_path = dir.path().join("activated.sock");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");

    let mut cmd = Command::new("python3");
    cmd.args(["-c", LAUNCHER])
        .arg(&sock_path)
        .args(server)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("TMPDIR", dir.path());
    let app = App::start_command_running(&dir, cmd, sock_path.clone(), program);

    let ready = wait_for(&notify, "READY=1");
    assert!(!ready.contains("RELOADING"), "{ready}");
    assert!(
        !worker_pids(app.pid()).is_empty(),
        "READY=1 came once a worker could serve"
    );
    check(&app);
    let status = wait_for(&notify, "STATUS=");
    assert!(status.contains("pool www"), "{status}");

    app.signal(Signal::SIGHUP);
    let reloading = wait_for(&notify, "RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    wait_for(&notify, "READY=1");
    check(&app);

    app.signal(Signal::SIGTERM);
    wait_for(&notify, "STOPPING=1");
    let status = app.wait_exit(Duration::from_secs(10)).expect("stops");
    assert_eq!(status.code(), Some(0));
    assert!(
        sock_path.exists(),
        "a socket systemd passed in is never unlinked"
    );
}

#[test]
fn socket_activation_and_notifications() {
    let app_example = bin_path("app-example").display().to_string();
    activated("systemd", &[&app_example, "--workers", "2"], &[], |app| {
        let r =
            fcgi_request(&app.unix(), "GET", "/hello", b"").expect("served on the passed socket");
        assert_eq!(r.status(), 200);
    });
}

/// A Perl FCGI responder (libfcgi-perl) that says what of systemd's environment it sees.
const PERL_SCRIPT: &str = r#"use strict;
use warnings;
use FCGI;
my $req = FCGI::Request();
while ($req->Accept() >= 0) {
    my @seen = grep { exists $ENV{$_} } qw(LISTEN_FDS LISTEN_PID NOTIFY_SOCKET);
    print "Content-Type: text/plain\r\n\r\nperl sees: @seen.\n";
}
"#;

#[test]
fn a_foreign_program_under_socket_activation_sees_none_of_systemds_environment() {
    let dir = TempDir::new("systemd-perl-script");
    let script = dir.path().join("responder.pl");
    std::fs::write(&script, PERL_SCRIPT).expect("script");
    let (pool, script) = (
        bin_path("fcgi-pool").display().to_string(),
        script.display().to_string(),
    );
    let server = [pool.as_str(), "--workers", "2"];
    activated(
        "systemd-perl",
        &server,
        &["/usr/bin/perl", &script],
        |app| {
            let r = fcgi_request(&app.unix(), "GET", "/perl", b"")
                .expect("served on the passed socket");
            assert_eq!(
                (r.status(), String::from_utf8_lossy(r.body()).as_ref()),
                (200, "perl sees: .\n"),
                "the program serves, and LISTEN_FDS, LISTEN_PID and NOTIFY_SOCKET are the pool's"
            );
        },
    );
}
