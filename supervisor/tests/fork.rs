//! The checks that fork (`fork_checks.rs`), run one after another on this binary's only
//! thread. `harness = false`: libtest would run each on a thread of its own, and forking a
//! multi-threaded process is unsound. Arguments without a leading `-` filter by name, as
//! libtest's do; the last line counts, in the form `2 passed, 0 failed`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let (mut passed, mut failed) = (0, 0);
    for (name, check) in supervisor::__fork_checks::CHECKS {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        match check() {
            Ok(()) => {
                println!("test {name} ... ok");
                passed += 1;
            }
            Err(e) => {
                println!("test {name} ... FAILED: {e}");
                failed += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
