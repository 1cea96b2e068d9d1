//! A real filesystem on a served volume: nbdfuse exposes the export as a
//! file, a loop device sits on it, and ext4 is made, filled, checked and
//! read back across a remount.

mod common;

use std::path::Path;
use std::process::Command;

use common::ext4::{Cleanup, checksums, loop_on_nbdfuse, make_tree, sh};
use common::serve::{Served, mirror_group, ok, run, tools};
use common::{Sandbox, is_root};

#[test]
fn ext4_on_nbdfuse_and_loop_survives_fsck_and_remount() {
    if !tools(&["nbdfuse", "losetup", "mkfs.ext4", "fsck.ext4"]) {
        return;
    }
    if !is_root() || !Path::new("/dev/fuse").exists() {
        common::skip_or_fail("nbdfuse and loop devices need root and /dev/fuse");
        return;
    }
    let sb = Sandbox::new();
    mirror_group(&sb, 160, 128);
    let served = Served::start(&sb, &[], &[]);
    let mut cleanup = Cleanup::default();

    let lo = loop_on_nbdfuse(&served.uri("data"), &sb.path("fuse"), &mut cleanup);
    ok(&mut sh("mkfs.ext4", &["-q", "-F", &lo]));

    let mnt = sb.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mount = |mnt: &Path| ok(&mut sh("mount", &[&lo, &mnt.display().to_string()]));
    let umount = |mnt: &Path| ok(&mut sh("umount", &[&mnt.display().to_string()]));
    mount(&mnt);
    {
        let mnt = mnt.clone();
        cleanup.push(move || {
            let _ = Command::new("umount").arg(&mnt).status();
        });
    }
    let tree = sb.path("tree");
    make_tree(&tree, 0);
    ok(&mut sh(
        "cp",
        &[
            "-a",
            &format!("{}/.", tree.display()),
            &mnt.display().to_string(),
        ],
    ));
    let want = checksums(&tree);
    assert_eq!(want.len(), 72);
    ok(&mut sh("sync", &[]));
    umount(&mnt);

    let (code, out, err) = run(&mut sh("fsck.ext4", &["-fn", &lo]));
    assert_eq!(code, 0, "fsck found problems:\n{out}\n{err}");

    mount(&mnt);
    assert_eq!(checksums(&mnt), want, "files differ after remount");
    umount(&mnt);
    drop(cleanup);

    let (code, err) = served.stop();
    assert_eq!(code, 0, "{err}");
}
