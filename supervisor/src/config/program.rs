//! `program`: the foreign FastCGI program each worker runs, found and checked at start so that
//! `--check-config` names a program that is missing or cannot be executed.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{bad, ConfigError};

/// A program and its arguments, its path resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    /// The executable, absolute or as given with a `/`.
    pub path: PathBuf,
    /// Its arguments (without the program's name).
    pub args: Vec<OsString>,
}

/// `program`: absent when empty; otherwise its first word must name an executable file, found
/// in `path_var` (the `PATH` value) when it has no `/`.
pub(super) fn program(
    words: &[String],
    path_var: Option<&str>,
) -> Result<Option<Program>, ConfigError> {
    let Some((first, args)) = words.split_first() else {
        return Ok(None);
    };
    let shown = words.join(" ");
    let path = if first.contains('/') {
        PathBuf::from(first)
    } else {
        search(first, path_var).ok_or_else(|| {
            bad(
                "program",
                &shown,
                format!("an executable file: {first} is not in PATH; give its full path"),
            )
        })?
    };
    if let Err(why) = executable(&path) {
        return Err(bad(
            "program",
            &shown,
            format!("an executable file: {} {why}", path.display()),
        ));
    }
    Ok(Some(Program {
        path,
        args: args.iter().map(OsString::from).collect(),
    }))
}

/// The first directory of `path_var` holding an executable `name`.
fn search(name: &str, path_var: Option<&str>) -> Option<PathBuf> {
    path_var?
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(name))
        .find(|p| executable(p).is_ok())
}

/// Why `path` cannot be executed by this process, if it cannot.
fn executable(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "does not exist".to_string(),
        _ => format!("cannot be read: {e}"),
    })?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err("is not executable (no x permission bit)".into());
    }
    nix::unistd::access(path, nix::unistd::AccessFlags::X_OK)
        .map_err(|e| format!("is not executable by this user: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(w: &[&str]) -> Vec<String> {
        w.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_bare_name_is_found_in_path_and_keeps_its_arguments() {
        let p = program(
            &words(&["sh", "-c", "true"]),
            Some("/nonexistent:/bin:/usr/bin"),
        )
        .expect("sh is in /bin")
        .expect("a program");
        assert!(p.path.ends_with("sh"), "{}", p.path.display());
        assert_eq!(p.args, vec![OsString::from("-c"), OsString::from("true")]);
        assert_eq!(program(&[], None).expect("no program is fine"), None);
    }

    #[test]
    fn a_missing_or_unexecutable_program_is_named() {
        let err = program(&words(&["/nonexistent/php-cgi"]), None).expect_err("missing");
        assert_eq!(
            err.to_string(),
            "invalid value \"/nonexistent/php-cgi\" for key \"program\": expected an \
             executable file: /nonexistent/php-cgi does not exist"
        );
        let err = program(&words(&["no-such-program-x"]), Some("/bin")).expect_err("not in PATH");
        assert!(
            err.to_string().contains("no-such-program-x is not in PATH"),
            "{err}"
        );
        // A file without an x bit: the crate's own manifest.
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let err = program(&words(&[manifest]), None).expect_err("not executable");
        assert!(err.to_string().contains("is not executable"), "{err}");
        let err = program(&words(&["/"]), None).expect_err("a directory");
        assert!(err.to_string().contains("is not a regular file"), "{err}");
    }
}
