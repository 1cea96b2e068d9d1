//! `demo`: a self-contained tour on image files. It runs the real commands
//! (printed as a user would type them) on three image files, one per
//! partition style and controller, and checks the data at every turn.

use std::fs;
use std::path::{Path, PathBuf};

use clap::Parser;

use super::{Cli, run};
use crate::{Error, MIB, Result};

/// Size of each demo disk (sparse image files).
const DISK_SIZE: u64 = 256 * MIB;
/// Bytes of test data written to the demo volume.
const PAYLOAD: usize = 24 * MIB as usize;

fn step(title: &str) {
    outln!("\n=== {title}");
}

/// Runs one mirrorvol command line, echoing it, and fails the demo if the
/// command fails.
fn sh(line: &str) -> Result<()> {
    outln!("$ mirrorvol {line}");
    let mut args = vec!["mirrorvol".to_string()];
    args.extend(line.split_whitespace().map(str::to_string));
    let cli = Cli::try_parse_from(args)
        .map_err(|e| Error::failed(format!("demo command {line:?}: {e}")))?;
    match run(cli) {
        0 => Ok(()),
        code => Err(Error::failed(format!(
            "demo command `mirrorvol {line}` exited with status {code}"
        ))),
    }
}

/// A deterministic, incompressible payload.
fn payload() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..PAYLOAD)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn check_file(path: &str, want: &[u8]) -> Result<()> {
    let got = fs::read(path).map_err(|e| Error::io_path("read", Path::new(path), e))?;
    if got.len() < want.len() || got[..want.len()] != *want {
        return Err(Error::failed(format!(
            "demo check failed: {path} does not hold the data written to the volume"
        )));
    }
    if got[want.len()..].iter().any(|&b| b != 0) {
        return Err(Error::failed(format!(
            "demo check failed: {path} holds non-zero bytes past the data written"
        )));
    }
    outln!(
        "check: {path} matches the {} MiB written",
        want.len() as u64 / MIB
    );
    Ok(())
}

pub fn demo(dir: Option<PathBuf>) -> Result<()> {
    let temp;
    let root = match dir {
        Some(d) => {
            fs::create_dir_all(&d).map_err(|e| Error::io_path("create", &d, e))?;
            d
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("mirrorvol-demo-")
                .tempdir()
                .map_err(|e| Error::io("cannot create a temporary directory", e))?;
            temp.path().to_path_buf()
        }
    };
    std::env::set_current_dir(&root).map_err(|e| Error::io_path("enter", &root, e))?;
    outln!("mirrorvol demo in {}", root.display());
    fs::create_dir_all("disks").map_err(|e| Error::io_path("create", Path::new("disks"), e))?;
    fs::create_dir_all("removed").map_err(|e| Error::io_path("create", Path::new("removed"), e))?;
    for name in ["a.img", "b.img", "c.img"] {
        let path = Path::new("disks").join(name);
        let f = fs::File::create(&path).map_err(|e| Error::io_path("create", &path, e))?;
        f.set_len(DISK_SIZE)
            .map_err(|e| Error::io_path("resize", &path, e))?;
    }

    step(
        "Three 256 MiB image files become a disk group: GPT, MBR and raw, each on its own controller",
    );
    sh("init disks/a.img --style gpt --controller ctrl0 --group demo")?;
    sh("--disks disks init disks/b.img --style mbr --controller ctrl1")?;
    sh("--disks disks init disks/c.img --style raw --controller ctrl2")?;

    step("A 64 MiB mirrored volume, duplexed across a.img (GPT) and b.img (MBR)");
    sh("--disks disks create data --size 64M --mirror --disk disks/a.img --disk disks/b.img")?;
    sh("--disks disks status")?;

    step("Data goes in: every write reaches both plexes");
    let data = payload();
    fs::write("payload.bin", &data)
        .map_err(|e| Error::io_path("write", Path::new("payload.bin"), e))?;
    sh("--disks disks copy payload.bin vol:data")?;

    step("Disk b.img fails: it is pulled out of the group's directory");
    fs::rename("disks/b.img", "removed/b.img")
        .map_err(|e| Error::io_path("move", Path::new("disks/b.img"), e))?;
    sh("--disks disks status")?;
    sh("--disks disks copy vol:data readback.bin")?;
    check_file("readback.bin", &data)?;

    step("Repair: the missing plex is replaced by new space on c.img and resynced");
    sh("--disks disks repair data")?;
    sh("--disks disks status")?;

    step("Break the mirror: the plex on c.img becomes volume data-copy");
    sh("--disks disks break data --disk disks/c.img --new-name data-copy")?;
    sh("--disks disks status")?;
    sh("--disks disks copy vol:data data.bin")?;
    sh("--disks disks copy vol:data-copy data-copy.bin")?;
    check_file("data.bin", &data)?;
    check_file("data-copy.bin", &data)?;

    outln!("\nThe demo finished: every check passed.");
    Ok(())
}
