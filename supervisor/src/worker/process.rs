//! What a worker makes of itself right after the fork, before any thread starts and before
//! any application code runs: its environment, its resource limits, then its account
//! (supplementary groups, gid, uid), verified, so nothing the application runs can regain
//! the master's privileges. Any failure ends the worker before it is ready: the master counts
//! it as a failed start and backs off.

use std::io;

use nix::sys::prctl;
use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Pid, Uid};

use crate::config::{Identity, Rlimit, Scheduling, WorkerProcess};

/// Applies `p` to this process. Call it while the process has one thread: `setenv` is not
/// thread-safe (a concurrent `getenv` may read freed memory), and a forked worker of the
/// single-threaded master has no other thread until its runtime starts.
pub(crate) fn become_configured(p: &WorkerProcess) -> io::Result<()> {
    environment(p);
    // Limits before the switch: as root, the hard limit can still be raised.
    limits(p)?;
    if p.scheduling == Scheduling::Batch {
        crate::sys::set_batch_scheduling().map_err(|e| {
            io::Error::other(format!(
                "cannot set cpu_scheduling = batch: sched_setscheduler: {e}"
            ))
        })?;
    }
    if let Some(id) = &p.identity {
        switch(id)?;
        // No exec'd program gains privileges either (setuid binaries, file capabilities).
        prctl::set_no_new_privs()
            .map_err(|e| io::Error::other(format!("cannot set no_new_privs: {e}")))?;
        // A change of credentials clears the parent-death signal and makes the process
        // non-dumpable: the first is set again, the second kept (other processes of the
        // same user cannot ptrace the worker) unless core files were asked for.
        prctl::set_pdeathsig(Signal::SIGKILL)?;
        if nix::unistd::getppid() == Pid::from_raw(1) {
            return Err(io::Error::other(
                "the master exited while this worker started",
            ));
        }
        if matches!(
            p.rlimit_core,
            Some(Rlimit::Unlimited) | Some(Rlimit::At(1..))
        ) {
            prctl::set_dumpable(true)
                .map_err(|e| io::Error::other(format!("cannot make the worker dumpable: {e}")))?;
        }
    }
    Ok(())
}

/// `clear_env`, then `env`: exactly the environment the configuration describes.
fn environment(p: &WorkerProcess) {
    if p.clear_env {
        for (name, _) in std::env::vars_os() {
            std::env::remove_var(name);
        }
    }
    for (name, value) in &p.env {
        std::env::set_var(name, value);
    }
}

/// `rlimit_files` and `rlimit_core`, soft and hard alike, as PHP-FPM sets them.
fn limits(p: &WorkerProcess) -> io::Result<()> {
    if let Some(n) = p.rlimit_files {
        set_limit(Resource::RLIMIT_NOFILE, "rlimit_files", n)?;
    }
    match p.rlimit_core {
        Some(Rlimit::At(n)) => set_limit(Resource::RLIMIT_CORE, "rlimit_core", n)?,
        Some(Rlimit::Unlimited) => set_limit(Resource::RLIMIT_CORE, "rlimit_core", RLIM_INFINITY)?,
        None => {}
    }
    Ok(())
}

fn set_limit(resource: Resource, key: &str, value: u64) -> io::Result<()> {
    setrlimit(resource, value, value).map_err(|e| {
        let shown = if value == RLIM_INFINITY {
            "unlimited".to_string()
        } else {
            value.to_string()
        };
        let hard = match getrlimit(resource) {
            Ok((_, RLIM_INFINITY)) => "unlimited".to_string(),
            Ok((_, hard)) => hard.to_string(),
            Err(_) => "unknown".to_string(),
        };
        // The kernel's ceiling for open files, even for root.
        let ceiling = match resource {
            Resource::RLIMIT_NOFILE => std::fs::read_to_string("/proc/sys/fs/nr_open")
                .map(|n| format!(", and no one above fs.nr_open = {}", n.trim()))
                .unwrap_or_default(),
            _ => String::new(),
        };
        io::Error::other(format!(
            "cannot set {key} = {shown}: setrlimit: {e} (the hard limit is {hard}: only root \
             may raise it{ceiling})"
        ))
    })
}

/// Groups, then gid, then uid: once the uid is not root, the groups can no longer change.
fn switch(id: &Identity) -> io::Result<()> {
    let fail = |step: &str, e: &dyn std::fmt::Display| {
        io::Error::other(format!(
            "cannot switch to user {} (uid {}, gid {}): {step}: {e}",
            id.user, id.uid, id.gid
        ))
    };
    let (uid, gid) = (Uid::from_raw(id.uid), Gid::from_raw(id.gid));
    let groups: Vec<Gid> = id.groups.iter().map(|&g| Gid::from_raw(g)).collect();
    if !is(id) {
        nix::unistd::setgroups(&groups).map_err(|e| fail("setgroups", &e))?;
        nix::unistd::setresgid(gid, gid, gid).map_err(|e| fail("setresgid", &e))?;
        nix::unistd::setresuid(uid, uid, uid).map_err(|e| fail("setresuid", &e))?;
    }
    if !is(id) {
        return Err(fail(
            "verify",
            &"real, effective and saved ids or the groups differ",
        ));
    }
    if id.uid != 0 && nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(fail("verify", &"setuid(0) succeeded: root can be regained"));
    }
    Ok(())
}

/// True when every uid and gid of this process, and its groups, are `id`'s already (a master
/// that is not root, with `user` set to itself).
fn is(id: &Identity) -> bool {
    let (Ok(u), Ok(g), Ok(groups)) = (
        nix::unistd::getresuid(),
        nix::unistd::getresgid(),
        nix::unistd::getgroups(),
    ) else {
        return false;
    };
    let mut have: Vec<u32> = groups.iter().map(|g| g.as_raw()).collect();
    let mut want = id.groups.clone();
    have.sort_unstable();
    have.dedup();
    want.sort_unstable();
    want.dedup();
    [u.real, u.effective, u.saved]
        .iter()
        .all(|x| x.as_raw() == id.uid)
        && [g.real, g.effective, g.saved]
            .iter()
            .all(|x| x.as_raw() == id.gid)
        && have == want
}

#[cfg(test)]
mod tests {
    use super::*;

    // Switching for real needs a process of its own (it cannot be undone, and the test
    // harness has threads): the e2e tests in `tests/tests/hardening.rs` do it. Here: what
    // this process already is needs no switch, and the error names the user and the errno.

    fn me() -> Identity {
        let gid = nix::unistd::getegid().as_raw();
        let mut groups: Vec<u32> = nix::unistd::getgroups()
            .expect("getgroups")
            .iter()
            .map(|g| g.as_raw())
            .collect();
        if groups.is_empty() {
            groups.push(gid);
        }
        Identity {
            user: "me".into(),
            uid: nix::unistd::geteuid().as_raw(),
            gid,
            groups,
        }
    }

    #[test]
    fn the_process_s_own_account_needs_no_switch() {
        let id = me();
        let groups_match = nix::unistd::getgroups().is_ok_and(|g| !g.is_empty());
        if groups_match && id.uid != 0 {
            switch(&id).expect("already this account");
        }
        let other = Identity {
            uid: id.uid.wrapping_add(1),
            ..me()
        };
        assert!(!is(&other));
    }

    #[test]
    fn a_limit_that_cannot_be_set_names_the_key_the_value_and_the_errno() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        // Above any fs.nr_open (at most 2^30 on Linux), so even root is refused.
        let too_many = (1u64 << 31).max(hard.saturating_add(1));
        let p = WorkerProcess {
            identity: None,
            allow_root: false,
            clear_env: false,
            env: Vec::new(),
            rlimit_files: Some(too_many),
            rlimit_core: None,
            scheduling: Scheduling::Normal,
        };
        let msg = limits(&p).expect_err("refused").to_string();
        assert!(
            msg.starts_with(&format!(
                "cannot set rlimit_files = {too_many}: setrlimit: EPERM"
            )),
            "{msg}"
        );
        assert!(msg.contains("the hard limit is"), "{msg}");
    }
}
