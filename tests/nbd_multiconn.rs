//! Multi-conn (issue 14): the server advertises NBD_FLAG_CAN_MULTI_CONN, so
//! a flush on one connection must make durable every write completed on
//! any connection. Proved on disks with a volatile cache that lose power
//! (`common::crash`): a write acknowledged on connection A, a flush on
//! connection B, a power cut; the write must be in what the platters hold.

mod common;

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use common::crash::{Cut, wrap_group};
use common::{MIB, pattern};
use mirrorvol::format::Style;
use mirrorvol::group::live::LiveGroup;
use mirrorvol::group::ops::{self, InitOptions};
use mirrorvol::group::{DiskSet, Group, Lookup};
use mirrorvol::nbd::client::Client;
use mirrorvol::nbd::proto;
use mirrorvol::nbd::server::{self, Listen, Server};

/// Where `needle` starts in `hay`, looking at sector boundaries.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    (0..hay.len().saturating_sub(needle.len()))
        .step_by(512)
        .find(|&i| hay[i..i + needle.len()] == *needle)
}

#[test]
fn a_flush_on_one_connection_makes_writes_of_another_durable() {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = ["a.img", "b.img"]
        .iter()
        .map(|n| dir.path().join(n))
        .collect();
    for p in &paths {
        fs::File::create(p).unwrap().set_len(16 * MIB).unwrap();
    }
    let opts = InitOptions {
        style: Style::Raw,
        controller: None,
        group: Some("g".into()),
        force: false,
        region_size: 64 * 1024,
        spare: false,
    };
    let mut g = ops::init(None, &paths, &opts).unwrap();
    g.create("m", 4 * MIB, 2, &[]).unwrap();
    drop(g);
    let set = DiskSet {
        explicit: paths.clone(),
        ..DiskSet::default()
    };
    let mut g = Group::assemble(&set, Lookup::Required).unwrap().unwrap();
    let cut = Cut::never();
    let crash = wrap_group(&mut g, &cut);
    g.start_bitmaps().unwrap();
    let live = LiveGroup::start(g, Default::default());
    let export = mirrorvol::daemon::volume_export(live.volume("m").unwrap());
    let server = Server::new(vec![export]);
    let sock = dir.path().join("nbd.sock");
    server.serve(server::bind(&Listen::Unix(sock.clone())).unwrap());

    let t = Duration::from_secs(10);
    let mut a = Client::connect_unix(&sock, "m", t).unwrap();
    let mut b = Client::connect_unix(&sock, "m", t).unwrap();
    // The write, acknowledged on A, sits in the disks' volatile caches.
    let data = pattern(64 * 1024, 14);
    assert_eq!(
        a.request(proto::CMD_WRITE, MIB, data.len() as u32, &data)
            .unwrap(),
        0
    );
    for c in &crash {
        assert!(
            find(&c.durable(), &data).is_none(),
            "the write is durable before any flush"
        );
    }
    // The flush goes on B.
    assert_eq!(b.request(proto::CMD_FLUSH, 0, 0, &[]).unwrap(), 0);
    // Power cut now: every unflushed write is lost.
    let durable: Vec<Vec<u8>> = crash.iter().map(|c| c.durable()).collect();
    for (i, image) in durable.iter().enumerate() {
        assert!(
            find(image, &data).is_some(),
            "after the flush on B, plex {i} lost the write acknowledged on A"
        );
    }
    a.disconnect();
    b.disconnect();
    server.shutdown();
}
