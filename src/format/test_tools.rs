//! Test-only helpers: finding the real system tools (sfdisk, blkid, mkfs)
//! that end-to-end tests check our on-disk bytes against.

use std::path::PathBuf;

/// The path of system tool `name`, or `None` after a loud skip message.
/// Under `MIRRORVOL_E2E=require` a missing tool fails the test instead.
pub fn system_tool(name: &str, test: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/sbin", "/usr/sbin", "/bin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        let require = std::env::var("MIRRORVOL_E2E").is_ok_and(|v| v == "require");
        assert!(
            !require,
            "{test}: `{name}` is not installed and MIRRORVOL_E2E=require is set"
        );
        eprintln!("!!!!!!!! {test}: SKIPPED, `{name}` is not installed !!!!!!!!");
    }
    found
}

/// Runs a tool and returns its stdout; panics with its stderr on failure.
pub fn run(tool: &std::path::Path, args: &[&std::ffi::OsStr]) -> String {
    let out = std::process::Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", tool.display()));
    assert!(
        out.status.success(),
        "{} {:?} failed: {}",
        tool.display(),
        args,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
