//! The value syntaxes the configuration shares between keys: durations (`30s`), byte sizes
//! (`512m`), listening addresses (`unix:/run/app.sock`), octal modes and user/group names, each
//! parsed here once and rendered back the same way for the help text.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// What a duration may look like, for error messages.
const DURATION_SYNTAX: &str = "a duration like 500ms, 30s, 5m, 1h";

/// What a size may look like, for error messages.
const SIZE_SYNTAX: &str = "a size like 512m, 1g, 65536";

/// What a listening address may look like, for error messages.
const LISTEN_SYNTAX: &str =
    "unix:/path/to.sock, /path/to.sock, 127.0.0.1:9000, [::1]:9000 or localhost:9000";

/// Parses `500ms`, `30s`, `5m`, `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = number_and_unit(s).ok_or_else(|| format!("expected {DURATION_SYNTAX}"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("expected {DURATION_SYNTAX}")),
    };
    Ok(d)
}

/// Writes a duration the way [`parse_duration`] reads it, in the largest exact unit, so a
/// default shown in `--help` can be pasted back as a value.
pub fn show_duration(d: Duration) -> String {
    if d.subsec_millis() != 0 {
        return format!("{}ms", d.as_millis());
    }
    let s = d.as_secs();
    match (s % 3600, s % 60) {
        _ if s == 0 => "0s".to_string(),
        (0, _) => format!("{}h", s / 3600),
        (_, 0) => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

/// Parses a byte size: `512`, `64k`, `256m`, `1g` (also `KiB`, `MiB`, `GiB`; binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (n, unit) = number_and_unit(s).ok_or_else(|| format!("expected {SIZE_SYNTAX}"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("expected {SIZE_SYNTAX}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| "size too large".to_string())
}

/// Splits `30s` into `(30, "s")`; `None` when there are no leading digits.
fn number_and_unit(s: &str) -> Option<(u64, &str)> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    Some((num.parse().ok()?, unit))
}

/// Parses a unix permission mode written in octal (`0660`, `660`, `0o660`).
pub fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| "expected an octal mode like 0660".to_string())
}

/// Which kind of account a name or number stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Account {
    /// A user: name or uid.
    User,
    /// A group: name or gid.
    Group,
}

/// Resolves a user or group name to its id; a number is taken as the id itself, as `chown` does.
pub fn account_id(v: &str, kind: Account) -> Result<u32, String> {
    if let Ok(n) = v.parse::<u32>() {
        return Ok(n);
    }
    let found = match kind {
        Account::Group => nix::unistd::Group::from_name(v)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw()),
        Account::User => nix::unistd::User::from_name(v)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw()),
    };
    found.ok_or_else(|| match kind {
        Account::Group => "expected an existing group name or a gid".to_string(),
        Account::User => "expected an existing user name or a uid".to_string(),
    })
}

/// A resource limit: a number, or none at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rlimit {
    /// At most this many (bytes, files).
    At(u64),
    /// `RLIM_INFINITY`.
    Unlimited,
}

/// Parses a size limit: `unlimited`, or a size as [`parse_size`] reads it.
pub fn parse_size_limit(s: &str) -> Result<Rlimit, String> {
    if s.eq_ignore_ascii_case("unlimited") || s.eq_ignore_ascii_case("infinity") {
        return Ok(Rlimit::Unlimited);
    }
    parse_size(s)
        .map(Rlimit::At)
        .map_err(|_| format!("expected unlimited or {SIZE_SYNTAX}"))
}

/// Why a value's `$` references could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpandError {
    /// `$NAME` or `${NAME}` names a variable the environment does not have.
    Missing(String),
    /// A `$` not followed by a name, `{name}` or another `$`.
    Syntax,
}

/// Replaces `$NAME` and `${NAME}` in `value` with what `lookup` says, and `$$` with `$`, as a
/// shell would without its other expansions. A name is ASCII letters, digits and `_`, not
/// starting with a digit.
pub fn expand(value: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, ExpandError> {
    let is_name_char = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, tail) = if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
            continue;
        } else if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').ok_or(ExpandError::Syntax)?;
            (&braced[..end], &braced[end + 1..])
        } else {
            let end = after.find(|c| !is_name_char(c)).unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        let starts_well = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_');
        if !starts_well || !name.chars().all(is_name_char) {
            return Err(ExpandError::Syntax);
        }
        out.push_str(&lookup(name).ok_or_else(|| ExpandError::Missing(name.to_string()))?);
        rest = tail;
    }
    out.push_str(rest);
    Ok(out)
}

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix socket file.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(a) => write!(f, "{a}"),
        }
    }
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("expected {LISTEN_SYNTAX}"));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if s.starts_with('/') {
            return Ok(ListenAddr::Unix(PathBuf::from(s)));
        }
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(ListenAddr::Tcp(sa));
        }
        // A host name resolves once, at startup, to its first address.
        s.to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .map(ListenAddr::Tcp)
            .ok_or_else(|| format!("expected {LISTEN_SYNTAX}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(
            parse_duration("soon").is_err()
                && parse_duration("5d").is_err()
                && parse_duration("").is_err()
        );
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("lots").is_err() && parse_size("1t").is_err());
    }

    #[test]
    fn a_shown_duration_parses_back_to_itself() {
        for ms in [
            0, 1, 500, 1000, 2000, 60_000, 75_000, 90_000, 3_600_000, 5_400_000,
        ] {
            let d = Duration::from_millis(ms);
            assert_eq!(
                parse_duration(&show_duration(d)),
                Ok(d),
                "{}",
                show_duration(d)
            );
        }
        assert_eq!(show_duration(Duration::from_secs(75)), "75s");
        assert_eq!(show_duration(Duration::from_secs(120)), "2m");
        assert_eq!(show_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn modes_and_accounts() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("0o600"), Ok(0o600));
        assert!(parse_mode("999").is_err() && parse_mode("1777").is_err());
        assert_eq!(account_id("0", Account::User), Ok(0));
        assert_eq!(account_id("root", Account::User), Ok(0));
        assert!(account_id("no-such-user-here", Account::User)
            .is_err_and(|e| e.contains("user name or a uid")));
        assert!(account_id("no-such-group-here", Account::Group)
            .is_err_and(|e| e.contains("group name or a gid")));
    }

    #[test]
    fn dollar_references_expand_from_the_environment() {
        let env = |name: &str| match name {
            "HOME" => Some("/home/app".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        let ok = |v: &str| expand(v, env).expect("expands");
        assert_eq!(ok("plain"), "plain");
        assert_eq!(ok("x$HOME"), "x/home/app");
        assert_eq!(ok("${HOME}/x"), "/home/app/x");
        assert_eq!(ok("$HOME/$EMPTY."), "/home/app/.");
        assert_eq!(ok("cost: $$5, $${HOME}"), "cost: $5, ${HOME}");
        assert_eq!(ok(""), "");
        assert_eq!(
            expand("a$NOPE", env),
            Err(ExpandError::Missing("NOPE".into()))
        );
        assert_eq!(
            expand("${NOPE}", env),
            Err(ExpandError::Missing("NOPE".into()))
        );
        for bad in ["$", "a$ b", "${HOME", "${}", "$1x", "${a-b}"] {
            assert_eq!(expand(bad, env), Err(ExpandError::Syntax), "{bad}");
        }
    }

    #[test]
    fn size_limits() {
        assert_eq!(parse_size_limit("unlimited"), Ok(Rlimit::Unlimited));
        assert_eq!(parse_size_limit("0"), Ok(Rlimit::At(0)));
        assert_eq!(parse_size_limit("1g"), Ok(Rlimit::At(1 << 30)));
        assert!(parse_size_limit("lots").is_err_and(|e| e.contains("unlimited")));
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            "unix:/run/a.sock".parse(),
            Ok(ListenAddr::Unix("/run/a.sock".into()))
        );
        assert_eq!(
            "/run/a.sock".parse(),
            Ok(ListenAddr::Unix("/run/a.sock".into()))
        );
        assert_eq!(
            "127.0.0.1:9000".parse(),
            Ok(ListenAddr::Tcp("127.0.0.1:9000".parse().expect("v4")))
        );
        assert_eq!(
            "[::1]:9000".parse(),
            Ok(ListenAddr::Tcp("[::1]:9000".parse().expect("v6")))
        );
        assert!("localhost:9000".parse::<ListenAddr>().is_ok());
        assert!("nonsense".parse::<ListenAddr>().is_err());
        assert!("unix:".parse::<ListenAddr>().is_err());
    }
}
