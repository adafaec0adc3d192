//! Validation: defaults, flags over the file, and errors that name their key.

use super::*;

fn cli(args: &[&str]) -> Cli {
    let mut all = vec!["app", "--listen", "127.0.0.1:9000"];
    all.extend_from_slice(args);
    Cli::parse_args(all).expect("valid flags")
}

fn file(toml: &str) -> Cli {
    toml::from_str(toml).expect("valid toml")
}

#[test]
fn defaults() {
    let c = Config::merge(&cli(&[]), Cli::default()).expect("valid");
    assert_eq!(c.pool.mode, PoolMode::Static);
    assert!(c.pool.workers >= 2);
    assert_eq!(c.backlog, 511);
    assert_eq!(c.socket.mode, 0o660);
    assert_eq!(c.keepalive_timeout, Duration::from_secs(75));
    assert_eq!(c.max_requests_in_flight.get(), 1);
    assert_eq!((c.max_requests, c.request_timeout), (0, None));
    assert_eq!(c.request_timeout_grace, DEFAULT_REQUEST_TIMEOUT_GRACE);
    assert_eq!(c.shutdown_timeout, DEFAULT_SHUTDOWN_TIMEOUT);
    assert_eq!(c.pool.idle_timeout, DEFAULT_IDLE_TIMEOUT);
    assert_eq!(c.pool.max_spawn_rate, DEFAULT_MAX_SPAWN_RATE);
    assert_eq!(c.log_format, LogFormat::Text);
    assert_eq!(
        (c.ping_response.as_str(), c.pool_name.as_str()),
        ("pong", "www")
    );
    assert!(!c.access_log && !c.check_config);
}

#[test]
fn dynamic_defaults_start_midway_between_the_spares() {
    let c =
        Config::merge(&cli(&["--pm", "dynamic", "--workers", "8"]), Cli::default()).expect("valid");
    assert_eq!((c.pool.min_spare, c.pool.max_spare), (1, 3));
    assert_eq!(c.pool.start_workers, 2);
    let c = Config::merge(&cli(&["--max-requests", "1000"]), Cli::default()).expect("valid");
    assert_eq!(c.max_requests_jitter, 100);
}

#[test]
fn flags_override_the_file() {
    let f = file("workers = 3\npm = \"dynamic\"\nmax_spare = 2\nrequest_timeout = \"30s\"\nlisten = [\"unix:/tmp/x.sock\"]\naccess_log = true");
    let c = Config::merge(&cli(&["--workers", "5"]), f).expect("valid");
    assert_eq!(c.pool.workers, 5);
    assert_eq!(c.pool.mode, PoolMode::Dynamic);
    assert_eq!(c.pool.max_spare, 2);
    assert_eq!(c.request_timeout, Some(Duration::from_secs(30)));
    assert!(c.access_log);
    assert_eq!(
        c.listen,
        vec![ListenAddr::Tcp("127.0.0.1:9000".parse().expect("addr"))]
    );
}

#[test]
fn the_file_alone_is_enough() {
    let f = file("listen = [\"unix:/tmp/x.sock\"]\nkeepalive_timeout = \"90s\"");
    let c = Config::merge(&Cli::parse_args(["app"]).expect("no flags"), f).expect("valid");
    assert_eq!(c.listen, vec![ListenAddr::Unix("/tmp/x.sock".into())]);
    assert_eq!(c.keepalive_timeout, Duration::from_secs(90));
}

#[test]
fn unknown_keys_are_named() {
    let err = toml::from_str::<Cli>("wrokers = 3").expect_err("unknown key");
    assert!(err.to_string().contains("wrokers"), "{err}");
}

#[test]
fn an_unreadable_file_is_named() {
    let flags = Cli::parse_args(["app", "--config", "/nonexistent/app.toml"]).expect("valid");
    let err = Config::load(&flags).expect_err("no such file");
    assert!(err.to_string().contains("/nonexistent/app.toml"), "{err}");
}

#[test]
fn no_listen_is_an_error_unless_the_sockets_are_inherited() {
    let mut flags = Cli::parse_args(["app"]).expect("valid");
    let err = Config::merge(&flags, Cli::default()).expect_err("no listen");
    assert!(err.to_string().contains("\"listen\""), "{err}");
    flags.inherits_listeners = true;
    let c = Config::merge(&flags, Cli::default()).expect("inherited sockets");
    assert!(c.listen.is_empty());
}

#[test]
fn each_bad_value_names_its_key() {
    let cases: &[(&[&str], &str)] = &[
        (&["--workers", "0"], "workers"),
        (&["--pm", "sometimes"], "pm"),
        (&["--request-timeout", "soon"], "request_timeout"),
        (&["--max-rss", "lots"], "max_rss"),
        (&["--socket-mode", "999"], "socket_mode"),
        (&["--log-format", "xml"], "log_format"),
        (
            &[
                "--pm",
                "dynamic",
                "--workers",
                "4",
                "--min-spare",
                "3",
                "--max-spare",
                "2",
            ],
            "max_spare",
        ),
        (&["--max-requests-in-flight", "0"], "max_requests_in_flight"),
        (&["--status-path", "status"], "status_path"),
        (&["--ping-path", "ping"], "ping_path"),
        (&["--backlog", "0"], "backlog"),
        (&["--max-spawn-rate", "0"], "max_spawn_rate"),
        (&["--idle-timeout", "later"], "idle_timeout"),
        (&["--keepalive-timeout", "1d"], "keepalive_timeout"),
        (&["--socket-owner", "no-such-user-here"], "socket_owner"),
        (&["--socket-group", "no-such-group-here"], "socket_group"),
        (&["--pm", "dynamic", "--min-spare", "0"], "min_spare"),
        (
            &["--pm", "dynamic", "--workers", "4", "--start-workers", "9"],
            "start_workers",
        ),
        (&["--listen", "nowhere"], "listen"),
    ];
    for (args, key) in cases {
        let err = Config::merge(&cli(args), Cli::default()).expect_err("invalid");
        let msg = err.to_string();
        assert!(msg.contains(&format!("\"{key}\"")), "{args:?}: {msg}");
        let value = args.last().expect("a value");
        assert!(
            msg.contains(&format!("\"{value}\"")),
            "{args:?} names the value: {msg}"
        );
        assert!(
            msg.contains(": expected "),
            "{args:?} says what is accepted: {msg}"
        );
    }
}

#[test]
fn socket_files_default_to_the_workers_account() {
    let c = Config::merge(
        &cli(&["--user", "root", "--group", "12345"]),
        Cli::default(),
    )
    .expect("valid");
    assert_eq!((c.socket.owner, c.socket.group), (Some(0), Some(12345)));
    let c = Config::merge(
        &cli(&[
            "--user",
            "root",
            "--socket-group",
            "7",
            "--socket-owner",
            "8",
        ]),
        Cli::default(),
    )
    .expect("valid");
    assert_eq!((c.socket.owner, c.socket.group), (Some(8), Some(7)));
    let c = Config::merge(&cli(&[]), Cli::default()).expect("valid");
    assert_eq!((c.socket.owner, c.socket.group), (None, None));
}

#[test]
fn workers_as_root_are_refused_with_how_to_opt_in() {
    let err = ConfigError::RunsAsRoot { user: None };
    assert_eq!(
        err.to_string(),
        "workers would run as root: the master runs as root and no user is set; set user = \
         \"nobody\" (--user nobody) or another account, or opt in with allow_root = true \
         (--allow-root)"
    );
    let err = ConfigError::RunsAsRoot {
        user: Some("root".into()),
    };
    assert!(err
        .to_string()
        .starts_with("workers would run as root: user \"root\" is uid 0; "));
}

#[test]
fn allowed_clients_from_the_key_else_from_fcgi_web_server_addrs() {
    let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("an address");
    let raw = cli(&[
        "--allowed-clients",
        "10.0.0.0/8",
        "--allowed-clients",
        "::1",
    ]);
    let a = allowed_clients(&raw, Some("192.168.1.1"))
        .expect("valid")
        .expect("set");
    assert!(a.allows(ip("10.1.2.3")) && a.allows(ip("::1")));
    assert!(
        !a.allows(ip("192.168.1.1")),
        "the key wins over the variable"
    );
    let from_env = allowed_clients(&cli(&[]), Some(" 127.0.0.2, 192.168.1.1 "))
        .expect("valid")
        .expect("set");
    assert!(from_env.allows(ip("127.0.0.2")) && from_env.allows(ip("192.168.1.1")));
    assert!(!from_env.allows(ip("127.0.0.1")));
    assert_eq!(allowed_clients(&cli(&[]), None).expect("valid"), None);
    assert_eq!(allowed_clients(&cli(&[]), Some("")).expect("valid"), None);
    let err = allowed_clients(&cli(&[]), Some("127.0.0.1,web1")).expect_err("a name");
    assert!(
        err.to_string()
            .starts_with("invalid value \"web1\" for key \"FCGI_WEB_SERVER_ADDRS\""),
        "{err}"
    );
    let err = Config::merge(&cli(&["--allowed-clients", "10.0.0.0/33"]), Cli::default())
        .expect_err("a bad prefix");
    assert!(
        err.to_string()
            .starts_with("invalid value \"10.0.0.0/33\" for key \"allowed_clients\""),
        "{err}"
    );
}

#[test]
fn queue_bounds() {
    let c = Config::merge(&cli(&[]), Cli::default()).expect("valid");
    assert_eq!((c.queue_timeout, c.max_queue), (None, None));
    let c =
        Config::merge(&cli(&[]), file("queue_timeout = \"500ms\"\nmax_queue = 0")).expect("valid");
    assert_eq!(
        (c.queue_timeout, c.max_queue),
        (Some(Duration::from_millis(500)), Some(0))
    );
    let err = Config::merge(&cli(&["--queue-timeout", "0"]), Cli::default()).expect_err("zero");
    assert!(err.to_string().contains("queue_timeout"), "{err}");
}
