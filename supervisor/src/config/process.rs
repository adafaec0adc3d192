//! What a worker becomes after the fork: the account it switches to (`user`, `group`,
//! `allow_root`), its environment (`clear_env`, `env`), its resource limits (`rlimit_*`) and its
//! CPU scheduling policy (`cpu_scheduling`).
//! Names are resolved here, in the master, so a worker makes no NSS lookups after the fork.

use std::ffi::CString;

use super::parse::{account_id, expand, parse_size_limit, Account, ExpandError, Rlimit};
use super::raw::{Cli, DEFAULT_ALLOW_ROOT, DEFAULT_CLEAR_ENV};
use super::{bad, parsed, ConfigError};

/// The account workers switch to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user as the operator wrote it, for log lines.
    pub user: String,
    /// The uid.
    pub uid: u32,
    /// The primary gid: `group`, else the user's own.
    pub gid: u32,
    /// The supplementary groups: the user's groups from the group database, with `gid`.
    pub groups: Vec<u32>,
}

/// The validated `user`, `group`, `allow_root`, `clear_env`, `env`, `rlimit_*` and
/// `cpu_scheduling` keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerProcess {
    /// Whom workers switch to; `None`: they stay whoever the master is.
    pub identity: Option<Identity>,
    /// Workers may run as root.
    pub allow_root: bool,
    /// Workers start from an empty environment.
    pub clear_env: bool,
    /// Set in each worker's environment, `$` references already expanded.
    pub env: Vec<(String, String)>,
    /// RLIMIT_NOFILE, soft and hard.
    pub rlimit_files: Option<u64>,
    /// RLIMIT_CORE, soft and hard.
    pub rlimit_core: Option<Rlimit>,
    /// The CPU scheduling policy of the workers (and the programs they run).
    pub scheduling: Scheduling,
}

/// A worker's CPU scheduling policy (`cpu_scheduling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scheduling {
    /// `SCHED_OTHER`, as every process starts.
    #[default]
    Normal,
    /// `SCHED_BATCH`: the same share of the CPU, but a worker woken by a request waits for
    /// the running process's turn to end instead of preempting it. Where nginx and the pool
    /// share saturated cores, nginx then writes many requests per turn and each worker reads
    /// many: fewer context switches, more throughput.
    Batch,
}

/// Validates the keys of [`WorkerProcess`]; `$` references read `master_env`.
pub fn worker_process(
    raw: &Cli,
    master_env: impl Fn(&str) -> Option<String>,
) -> Result<WorkerProcess, ConfigError> {
    let identity = identity(raw.user.as_deref(), raw.group.as_deref())?;
    let env = raw
        .env
        .iter()
        .map(|(name, value)| env_var(name, value, &master_env))
        .collect::<Result<Vec<_>, _>>()?;
    if raw.rlimit_files == Some(0) {
        return Err(bad(
            "rlimit_files",
            0,
            "at least 1 (a worker needs a file for every connection)",
        ));
    }
    Ok(WorkerProcess {
        identity,
        allow_root: raw.allow_root.unwrap_or(DEFAULT_ALLOW_ROOT),
        clear_env: raw.clear_env.unwrap_or(DEFAULT_CLEAR_ENV),
        env,
        rlimit_files: raw.rlimit_files,
        rlimit_core: parsed("rlimit_core", raw.rlimit_core.as_deref(), parse_size_limit)?,
        scheduling: match raw.cpu_scheduling.as_deref() {
            None | Some("normal") => Scheduling::Normal,
            Some("batch") => Scheduling::Batch,
            Some(other) => return Err(bad("cpu_scheduling", other, "normal or batch")),
        },
    })
}

/// `user` and `group`, resolved to ids and the supplementary groups.
fn identity(user: Option<&str>, group: Option<&str>) -> Result<Option<Identity>, ConfigError> {
    let Some(user) = user else {
        return match group {
            Some(g) => Err(bad(
                "group",
                g,
                "a user too: workers switch group only with `user`",
            )),
            None => Ok(None),
        };
    };
    let uid = account_id(user, Account::User).map_err(|e| bad("user", user, strip(&e)))?;
    let entry = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten();
    let gid = match group {
        Some(g) => account_id(g, Account::Group).map_err(|e| bad("group", g, strip(&e)))?,
        None => match &entry {
            Some(u) => u.gid.as_raw(),
            None => {
                return Err(bad(
                    "user",
                    user,
                    "a user in the passwd database, or `group` as well for a bare uid",
                ))
            }
        },
    };
    // The groups the account belongs to, as `initgroups` would set them, looked up now.
    let groups = entry
        .as_ref()
        .and_then(|u| CString::new(u.name.as_str()).ok())
        .and_then(|name| nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid)).ok())
        .map(|list| list.into_iter().map(|g| g.as_raw()).collect::<Vec<_>>())
        .filter(|list| !list.is_empty())
        .unwrap_or_else(|| vec![gid]);
    Ok(Some(Identity {
        user: user.to_string(),
        uid,
        gid,
        groups,
    }))
}

fn strip(e: &str) -> &str {
    e.trim_start_matches("expected ")
}

/// One `env` entry, its `$` references expanded from the master's environment.
fn env_var(
    name: &str,
    value: &str,
    master_env: impl Fn(&str) -> Option<String>,
) -> Result<(String, String), ConfigError> {
    if name.is_empty() || name.contains(['=', '\0']) {
        return Err(bad("env", name, "a variable name without = or NUL"));
    }
    let shown = format!("{name}={value}");
    let expanded = expand(value, master_env).map_err(|e| match e {
        ExpandError::Missing(var) => bad(
            "env",
            &shown,
            format!("{var} to be set in the master's environment (write $$ for a literal $)"),
        ),
        ExpandError::Syntax => bad("env", &shown, "$NAME, ${NAME} or $$ after each $"),
    })?;
    if expanded.contains('\0') {
        return Err(bad("env", &shown, "a value without NUL"));
    }
    Ok((name.to_string(), expanded))
}

/// What the master's own user allows: as root it refuses workers that would stay root unless
/// `allow_root` says so; as another user it can switch workers to no one but itself.
pub fn check_privileges(p: &WorkerProcess, master_euid: u32) -> Result<(), ConfigError> {
    let stays_root = match &p.identity {
        None => master_euid == 0,
        Some(id) => id.uid == 0,
    };
    if stays_root && !p.allow_root {
        return Err(ConfigError::RunsAsRoot {
            user: p.identity.as_ref().map(|id| id.user.clone()),
        });
    }
    match &p.identity {
        Some(id) if master_euid != 0 && id.uid != master_euid => Err(bad(
            "user",
            &id.user,
            format!(
                "the master's own uid {master_euid}: only a master started as root can \
                 switch workers to another user"
            ),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(toml: &str) -> Cli {
        toml::from_str(toml).expect("valid toml")
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_keep_the_master_s_account_and_environment() {
        let p = worker_process(&Cli::default(), no_env).expect("valid");
        assert_eq!(p.identity, None);
        assert!(!p.allow_root && !p.clear_env && p.env.is_empty());
        assert_eq!((p.rlimit_files, p.rlimit_core), (None, None));
        assert_eq!(p.scheduling, Scheduling::Normal);
    }

    #[test]
    fn cpu_scheduling_is_normal_or_batch() {
        let p = worker_process(&raw("cpu_scheduling = \"batch\""), no_env).expect("valid");
        assert_eq!(p.scheduling, Scheduling::Batch);
        let p = worker_process(&raw("cpu_scheduling = \"normal\""), no_env).expect("valid");
        assert_eq!(p.scheduling, Scheduling::Normal);
        let err = worker_process(&raw("cpu_scheduling = \"fifo\""), no_env).expect_err("fifo");
        assert!(err.to_string().contains("normal or batch"), "{err}");
    }

    #[test]
    fn a_user_resolves_to_its_ids_and_groups() {
        let p = worker_process(&raw("user = \"root\""), no_env).expect("root exists");
        let id = p.identity.expect("an identity");
        assert_eq!((id.uid, id.gid), (0, 0));
        assert!(id.groups.contains(&0), "{:?}", id.groups);
        let p = worker_process(&raw("user = \"0\"\ngroup = \"12345\""), no_env).expect("valid");
        let id = p.identity.expect("an identity");
        assert_eq!((id.uid, id.gid), (0, 12345));
        assert!(id.groups.contains(&12345), "{:?}", id.groups);
        // A uid with no passwd entry has no group of its own to fall back on.
        let p = worker_process(&raw("user = \"4000000\"\ngroup = \"4000000\""), no_env);
        let id = p.expect("valid").identity.expect("an identity");
        assert_eq!(id.groups, vec![4_000_000]);
    }

    #[test]
    fn bad_accounts_name_their_key() {
        let cases = [
            ("user = \"no-such-user-here\"", "\"user\""),
            ("user = \"4000000\"", "\"user\""),
            (
                "user = \"root\"\ngroup = \"no-such-group-here\"",
                "\"group\"",
            ),
            ("group = \"root\"", "\"group\""),
            ("rlimit_files = 0", "\"rlimit_files\""),
            ("rlimit_core = \"lots\"", "\"rlimit_core\""),
            ("[env]\n\"A=B\" = \"x\"", "\"env\""),
        ];
        for (toml, key) in cases {
            let err = worker_process(&raw(toml), no_env).expect_err(toml);
            assert!(err.to_string().contains(key), "{toml}: {err}");
        }
    }

    #[test]
    fn env_values_expand_the_master_s_variables_and_a_missing_one_is_named() {
        let master = |name: &str| (name == "HOME").then(|| "/root".to_string());
        let p =
            worker_process(&raw("clear_env = true\n[env]\nG = \"x$HOME\""), master).expect("valid");
        assert!(p.clear_env);
        assert_eq!(p.env, vec![("G".to_string(), "x/root".to_string())]);
        let err = worker_process(&raw("[env]\nG = \"${NOPE}/x\""), master).expect_err("missing");
        let msg = err.to_string();
        assert!(
            msg.contains("\"env\"")
                && msg.contains("G=${NOPE}/x")
                && msg.contains("NOPE to be set"),
            "{msg}"
        );
        let err = worker_process(&raw("[env]\nG = \"a$ b\""), master).expect_err("syntax");
        assert!(err.to_string().contains("$$"), "{err}");
    }

    #[test]
    fn rlimits() {
        let p = worker_process(
            &raw("rlimit_files = 4096\nrlimit_core = \"unlimited\""),
            no_env,
        )
        .expect("valid");
        assert_eq!(p.rlimit_files, Some(4096));
        assert_eq!(p.rlimit_core, Some(Rlimit::Unlimited));
        let p = worker_process(&raw("rlimit_core = 0"), no_env).expect("valid");
        assert_eq!(p.rlimit_core, Some(Rlimit::At(0)));
    }

    #[test]
    fn root_workers_need_the_opt_in() {
        let p = |toml: &str| worker_process(&raw(toml), no_env).expect("valid");
        // The master as root: without `user`, or with a `user` that is root, refused.
        for toml in ["", "user = \"root\"", "user = \"0\"\ngroup = \"0\""] {
            let err = check_privileges(&p(toml), 0).expect_err(toml);
            let msg = err.to_string();
            assert!(
                msg.contains("allow_root = true") && msg.contains("--allow-root"),
                "{toml}: {msg}"
            );
            let allowed = format!("{toml}\nallow_root = true");
            check_privileges(&p(&allowed), 0).expect("opted in");
        }
        assert!(check_privileges(&p(""), 0).is_err_and(|e| e.to_string().contains("--user nobody")));
        check_privileges(&p("user = \"4000000\"\ngroup = \"4000000\""), 0).expect("not root");
        // The master as uid 1000: nothing to refuse without `user`, and no one to switch to
        // but itself.
        check_privileges(&p(""), 1000).expect("stays uid 1000");
        check_privileges(&p("user = \"1000\"\ngroup = \"1000\""), 1000).expect("itself");
        let err = check_privileges(&p("user = \"4000000\"\ngroup = \"1\""), 1000)
            .expect_err("cannot switch");
        assert!(err.to_string().contains("started as root"), "{err}");
    }
}
