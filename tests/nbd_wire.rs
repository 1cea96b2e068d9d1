//! The server at the byte level: every handshake reply path, malformed and
//! out-of-range requests (each gets its error and the connection goes on),
//! bad magic (only that connection closes), pipelining, and shutdown.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::serve::{Served, mirror_group};
use common::{MIB, Sandbox, pattern};
use mirrorvol::nbd::proto::{self, Request};

/// A raw NBD client for tests.
/// One context's id and its extents (length, flags).
type ContextExtents = (u32, Vec<(u32, u32)>);

struct Client {
    s: UnixStream,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

impl Client {
    /// Connects and completes the greeting with the given client flags.
    fn connect(sock: &Path, flags: u32) -> Client {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Client { s };
        let mut g = [0u8; 18];
        c.s.read_exact(&mut g).unwrap();
        assert_eq!(g, proto::encode_greeting());
        c.s.write_all(&flags.to_be_bytes()).unwrap();
        c
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut m = proto::IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).unwrap();
    }

    /// Reads one option reply: (option, type, data).
    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            proto::REPLY_MAGIC
        );
        let mut data = vec![0u8; be32(&h[16..]) as usize];
        self.s.read_exact(&mut data).unwrap();
        (be32(&h[8..]), be32(&h[12..]), data)
    }

    fn info_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    /// Enters transmission with NBD_OPT_GO; returns the export size.
    fn go(sock: &Path, name: &str) -> (Client, u64) {
        let mut c = Client::connect(sock, 3);
        c.option(proto::OPT_GO, &Client::info_data(name, &[]));
        let mut size = None;
        loop {
            let (_, kind, data) = c.option_reply();
            match kind {
                proto::REP_INFO => {
                    if u16::from_be_bytes([data[0], data[1]]) == proto::INFO_EXPORT {
                        size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                    }
                }
                proto::REP_ACK => return (c, size.unwrap()),
                other => panic!("GO answered {other:#x}"),
            }
        }
    }

    fn send(&mut self, kind: u16, flags: u16, handle: u64, offset: u64, len: u32, data: &[u8]) {
        let r = Request {
            flags,
            kind,
            handle,
            offset,
            len: len.into(),
        };
        let mut m = proto::encode_request(&r).to_vec();
        m.extend_from_slice(data);
        self.s.write_all(&m).unwrap();
    }

    /// Reads a simple reply: (error, handle).
    fn reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(be32(&h), proto::SIMPLE_REPLY_MAGIC);
        (
            be32(&h[4..]),
            u64::from_be_bytes(h[8..].try_into().unwrap()),
        )
    }

    fn write(&mut self, handle: u64, offset: u64, data: &[u8]) -> u32 {
        self.send(proto::CMD_WRITE, 0, handle, offset, data.len() as u32, data);
        let (err, h) = self.reply();
        assert_eq!(h, handle);
        err
    }

    fn read(&mut self, handle: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.send(proto::CMD_READ, 0, handle, offset, len, &[]);
        let (err, h) = self.reply();
        assert_eq!(h, handle);
        if err != 0 {
            return Err(err);
        }
        let mut buf = vec![0u8; len as usize];
        self.s.read_exact(&mut buf).unwrap();
        Ok(buf)
    }

    /// Reads one structured reply chunk: (flags, type, handle, payload).
    fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let mut h = [0u8; proto::CHUNK_HEADER_LEN];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(be32(&h), proto::STRUCTURED_REPLY_MAGIC);
        let mut payload = vec![0u8; be32(&h[16..]) as usize];
        self.s.read_exact(&mut payload).unwrap();
        (
            u16::from_be_bytes([h[4], h[5]]),
            u16::from_be_bytes([h[6], h[7]]),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            payload,
        )
    }

    /// Reads every chunk of one structured reply to `handle`, up to the one
    /// flagged done.
    fn chunks(&mut self, handle: u64) -> Vec<(u16, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let (flags, kind, h, payload) = self.chunk();
            assert_eq!(h, handle);
            out.push((kind, payload));
            if flags & proto::REPLY_FLAG_DONE != 0 {
                return out;
            }
        }
    }

    /// A structured read: the bytes (holes filled with zeroes) and how
    /// many data and hole chunks carried them, or the error and message.
    fn read_structured(
        &mut self,
        handle: u64,
        flags: u16,
        offset: u64,
        len: u32,
    ) -> Result<(Vec<u8>, usize, usize), (u32, String)> {
        self.send(proto::CMD_READ, flags, handle, offset, len, &[]);
        let mut buf = vec![0xeeu8; len as usize];
        let mut covered = 0u64;
        let (mut data, mut holes) = (0, 0);
        for (kind, p) in self.chunks(handle) {
            match kind {
                proto::REPLY_TYPE_OFFSET_DATA => {
                    let at = (u64::from_be_bytes(p[..8].try_into().unwrap()) - offset) as usize;
                    buf[at..at + p.len() - 8].copy_from_slice(&p[8..]);
                    covered += (p.len() - 8) as u64;
                    data += 1;
                }
                proto::REPLY_TYPE_OFFSET_HOLE => {
                    let at = (u64::from_be_bytes(p[..8].try_into().unwrap()) - offset) as usize;
                    let n = be32(&p[8..]) as usize;
                    buf[at..at + n].fill(0);
                    covered += n as u64;
                    holes += 1;
                }
                proto::REPLY_TYPE_ERROR => {
                    let n = u16::from_be_bytes([p[4], p[5]]) as usize;
                    return Err((be32(&p), String::from_utf8(p[6..6 + n].to_vec()).unwrap()));
                }
                proto::REPLY_TYPE_NONE => {}
                other => panic!("a read answered with chunk type {other}"),
            }
        }
        assert_eq!(covered, u64::from(len), "the chunks cover the read");
        Ok((buf, data, holes))
    }

    /// A block status: each context's (id, extents).
    fn block_status(
        &mut self,
        handle: u64,
        flags: u16,
        offset: u64,
        len: u32,
    ) -> Result<Vec<ContextExtents>, u32> {
        self.send(proto::CMD_BLOCK_STATUS, flags, handle, offset, len, &[]);
        let mut out = Vec::new();
        for (kind, p) in self.chunks(handle) {
            match kind {
                proto::REPLY_TYPE_BLOCK_STATUS => {
                    let extents = p[4..]
                        .chunks_exact(8)
                        .map(|e| (be32(e), be32(&e[4..])))
                        .collect();
                    out.push((be32(&p), extents));
                }
                proto::REPLY_TYPE_ERROR => return Err(be32(&p)),
                other => panic!("a block status answered with chunk type {other}"),
            }
        }
        Ok(out)
    }

    /// Sends a meta context option and reads the contexts it answers
    /// with: (id, name) each, or the error reply type.
    fn meta(
        &mut self,
        opt: u32,
        export: &str,
        queries: &[&str],
    ) -> Result<Vec<(u32, String)>, u32> {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        self.option(opt, &d);
        let mut out = Vec::new();
        loop {
            let (o, kind, data) = self.option_reply();
            assert_eq!(o, opt);
            match kind {
                proto::REP_META_CONTEXT => {
                    out.push((be32(&data), String::from_utf8(data[4..].to_vec()).unwrap()))
                }
                proto::REP_ACK => return Ok(out),
                err => return Err(err),
            }
        }
    }

    /// True when the server closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

/// Sends `n` reads of `len` bytes on `c` (each at the next multiple of
/// `len`, wrapping at 16 MiB or at twice `len`, whichever is larger) and
/// reads none of the replies. The server stops reading the requests once
/// the replies fill its in-flight allowance, so the writing may block: it
/// runs aside.
fn flood_reads(c: &Client, n: u64, len: u64) {
    let span = (16 * MIB).max(2 * len);
    let mut burst = Vec::new();
    for i in 0..n {
        let r = Request {
            flags: 0,
            kind: proto::CMD_READ,
            handle: i,
            offset: (i * len) % span,
            len,
        };
        burst.extend_from_slice(&proto::encode_request(&r));
    }
    let mut w = c.s.try_clone().unwrap();
    std::thread::spawn(move || {
        let _ = w.write_all(&burst);
    });
}

fn served(vols: &[&str]) -> (Sandbox, Served) {
    let sb = Sandbox::new();
    mirror_group(&sb, 96, 16);
    for v in vols {
        sb.mv(&["create", v, "--size", "4M"]).ok();
    }
    let s = Served::start(&sb, &[], &[]);
    (sb, s)
}

#[test]
fn handshake_answers_every_option_and_reads_on_after_errors() {
    let (_sb, s) = served(&["small"]);
    let mut c = Client::connect(&s.sock, 3);

    // Unknown option: ERR_UNSUP, and the next option is still read.
    c.option(99, b"whatever");
    assert_eq!(c.option_reply().1, proto::REP_ERR_UNSUP);
    // TLS is not configured: refused by policy, and the next option is read.
    c.option(proto::OPT_STARTTLS, b"");
    assert_eq!(c.option_reply().1, proto::REP_ERR_POLICY);
    // Metadata contexts before structured replies are invalid.
    c.option(proto::OPT_LIST_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(c.option_reply().1, proto::REP_ERR_INVALID);

    // LIST: one SERVER reply per volume, then ACK.
    c.option(proto::OPT_LIST, b"");
    let mut names = Vec::new();
    loop {
        let (opt, kind, data) = c.option_reply();
        assert_eq!(opt, proto::OPT_LIST);
        match kind {
            proto::REP_SERVER => names.push(String::from_utf8(data[4..].to_vec()).unwrap()),
            proto::REP_ACK => break,
            k => panic!("LIST answered {k:#x}"),
        }
    }
    assert_eq!(names, ["data", "small"]);
    c.option(proto::OPT_LIST, b"junk");
    assert_eq!(c.option_reply().1, proto::REP_ERR_INVALID);

    // INFO on an unknown name, and on the empty name with two volumes.
    c.option(proto::OPT_INFO, &Client::info_data("nosuch", &[]));
    let (_, kind, msg) = c.option_reply();
    assert_eq!(kind, proto::REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&msg).contains("nosuch"));
    c.option(proto::OPT_INFO, &Client::info_data("", &[]));
    assert_eq!(c.option_reply().1, proto::REP_ERR_UNKNOWN);
    // Malformed INFO data.
    c.option(proto::OPT_INFO, &[0, 0, 0, 50, b'x', 0, 0]);
    assert_eq!(c.option_reply().1, proto::REP_ERR_INVALID);

    // INFO on a volume: EXPORT, BLOCK_SIZE, NAME when asked, then ACK.
    c.option(
        proto::OPT_INFO,
        &Client::info_data("small", &[proto::INFO_BLOCK_SIZE, proto::INFO_NAME]),
    );
    let mut seen = Vec::new();
    loop {
        let (opt, kind, d) = c.option_reply();
        assert_eq!(opt, proto::OPT_INFO);
        if kind == proto::REP_ACK {
            break;
        }
        assert_eq!(kind, proto::REP_INFO);
        let info = u16::from_be_bytes([d[0], d[1]]);
        match info {
            proto::INFO_EXPORT => {
                assert_eq!(u64::from_be_bytes(d[2..10].try_into().unwrap()), 4 * MIB);
                let flags = u16::from_be_bytes([d[10], d[11]]);
                assert_eq!(flags, mirrorvol::nbd::server::TRANSMISSION_FLAGS);
                assert!(flags & proto::FLAG_CAN_MULTI_CONN != 0);
            }
            proto::INFO_BLOCK_SIZE => {
                assert_eq!(be32(&d[2..]), 512);
                assert_eq!(be32(&d[6..]), 4096);
                assert_eq!(be32(&d[10..]), proto::MAX_REQUEST);
            }
            proto::INFO_NAME => assert_eq!(&d[2..], b"small"),
            other => panic!("unexpected info {other}"),
        }
        seen.push(info);
    }
    seen.sort();
    assert_eq!(seen, [0, 1, 3]);

    // ABORT: ACK, then the server closes.
    c.option(proto::OPT_ABORT, b"");
    assert_eq!(c.option_reply().1, proto::REP_ACK);
    assert!(c.closed());
    assert_eq!(s.stop().0, 0);
}

#[test]
fn export_name_option_enters_transmission_with_or_without_zeroes() {
    let (_sb, s) = served(&[]);
    for (flags, pad) in [(1u32, 124usize), (3, 0)] {
        let mut c = Client::connect(&s.sock, flags);
        // Empty name: the only volume.
        c.option(proto::OPT_EXPORT_NAME, b"");
        let mut r = vec![0u8; 10 + pad];
        c.s.read_exact(&mut r).unwrap();
        assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), 16 * MIB);
        assert!(r[10..].iter().all(|&b| b == 0));
        assert_eq!(c.write(1, 0, &[7u8; 512]), 0);
        assert_eq!(c.read(2, 0, 512).unwrap(), vec![7u8; 512]);
        c.send(proto::CMD_DISC, 0, 3, 0, 0, &[]);
        assert!(c.closed());
    }
    // Unknown name with EXPORT_NAME: the spec says to close.
    let mut c = Client::connect(&s.sock, 3);
    c.option(proto::OPT_EXPORT_NAME, b"nosuch");
    assert!(c.closed());
    // Unknown client flags: closed.
    let mut c = Client::connect(&s.sock, 0x80);
    assert!(c.closed());
    assert_eq!(s.stop().0, 0);
}

#[test]
fn malformed_and_out_of_range_requests_get_errors_and_other_clients_go_on() {
    let (_sb, s) = served(&[]);
    let (mut other, size) = Client::go(&s.sock, "data");
    assert_eq!(other.write(1, 0, &pattern(4096, 1)), 0);

    let (mut c, _) = Client::go(&s.sock, "data");
    // A write of no bytes is a write, not a malformed one.
    assert_eq!(c.write(9, 0, &[]), 0);
    // Past the end: EINVAL for a read, ENOSPC for writes (the spec's SHOULD).
    assert_eq!(c.read(10, size, 512), Err(proto::EINVAL));
    assert_eq!(c.read(11, u64::MAX - 10, 512), Err(proto::EINVAL));
    assert_eq!(c.write(12, size - 512, &[1u8; 1024]), proto::ENOSPC);
    c.send(proto::CMD_TRIM, 0, 13, size, 4096, &[]);
    assert_eq!(c.reply(), (proto::ENOSPC, 13));
    c.send(proto::CMD_WRITE_ZEROES, 0, 14, u64::MAX, 1, &[]);
    assert_eq!(c.reply(), (proto::ENOSPC, 14));
    // Over the maximum size: EINVAL; the write's payload is skipped.
    let big = vec![0x5au8; proto::MAX_REQUEST as usize + 4096];
    assert_eq!(c.write(15, 0, &big), proto::EINVAL);
    assert_eq!(c.read(16, 0, proto::MAX_REQUEST + 1), Err(proto::EINVAL));
    // Unknown command, unknown and misplaced flags: EINVAL.
    c.send(99, 0, 17, 0, 0, &[]);
    assert_eq!(c.reply(), (proto::EINVAL, 17));
    c.send(proto::CMD_BLOCK_STATUS, 0, 18, 0, 4096, &[]);
    assert_eq!(c.reply(), (proto::EINVAL, 18));
    c.send(proto::CMD_READ, proto::CMD_FLAG_DF, 19, 0, 512, &[]);
    assert_eq!(c.reply(), (proto::EINVAL, 19));
    c.send(
        proto::CMD_WRITE,
        proto::CMD_FLAG_NO_HOLE,
        20,
        0,
        512,
        &[9u8; 512],
    );
    assert_eq!(c.reply(), (proto::EINVAL, 20));
    c.send(proto::CMD_WRITE, 0x8000, 21, 0, 512, &[9u8; 512]);
    assert_eq!(c.reply(), (proto::EINVAL, 21));
    // The connection still works, and nothing of the rejected writes landed.
    assert_eq!(c.read(22, 0, 4096).unwrap(), pattern(4096, 1));
    assert_eq!(c.write(23, size - 512, &[3u8; 512]), 0);
    assert_eq!(c.read(24, size - 512, 512).unwrap(), vec![3u8; 512]);
    // Bad magic closes this connection only.
    c.s.write_all(&[0xde; 28]).unwrap();
    assert!(c.closed());

    // A client that hangs up mid-write, and one that sends garbage.
    let (mut d, _) = Client::go(&s.sock, "data");
    d.send(proto::CMD_WRITE, 0, 1, 0, 65536, &[1u8; 100]);
    drop(d);
    let mut g = UnixStream::connect(&s.sock).unwrap();
    let _ = g.write_all(&pattern(5000, 9));
    drop(g);

    // The first client and a new one both work.
    assert_eq!(other.read(2, 0, 4096).unwrap(), pattern(4096, 1));
    let (mut n, _) = Client::go(&s.sock, "");
    assert_eq!(n.read(1, 0, 4096).unwrap(), pattern(4096, 1));
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn pipelined_requests_each_get_their_reply() {
    let (_sb, s) = served(&[]);
    let (mut c, _) = Client::go(&s.sock, "data");
    // 200 writes (more than the in-flight limit) sent without waiting.
    let mut burst = Vec::new();
    for i in 0..200u64 {
        let r = Request {
            flags: if i % 7 == 0 { proto::CMD_FLAG_FUA } else { 0 },
            kind: proto::CMD_WRITE,
            handle: 1000 + i,
            offset: i * 8192,
            len: 8192,
        };
        burst.extend_from_slice(&proto::encode_request(&r));
        burst.extend_from_slice(&pattern(8192, i));
    }
    let mut w = c.s.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&burst).unwrap());
    let mut handles: Vec<u64> = (0..200)
        .map(|_| {
            let (err, h) = c.reply();
            assert_eq!(err, 0);
            h
        })
        .collect();
    writer.join().unwrap();
    handles.sort();
    assert_eq!(handles, (1000..1200).collect::<Vec<_>>());
    c.send(proto::CMD_FLUSH, 0, 5, 0, 0, &[]);
    assert_eq!(c.reply(), (0, 5));
    for i in (0..200u64).step_by(37) {
        assert_eq!(c.read(i, i * 8192, 8192).unwrap(), pattern(8192, i));
    }
    assert_eq!(s.stop().0, 0);
}

/// Replies the socket could not take at once are still sent when the
/// client says goodbye, refusals included: 20000 reads past the end (each
/// refused at once) and NBD_CMD_DISC, sent without reading, fill the
/// server's socket with refusals; then every one of them arrives before
/// the server closes. (Refusals held no share of the in-flight allowance
/// before, so the server stopped once nothing else was in flight, with
/// the refusals it still held unsent; and a client that never read them
/// grew the server's memory without bound.)
#[test]
fn refusals_held_behind_a_full_socket_are_sent_after_the_goodbye() {
    let (_sb, s) = served(&[]);
    let (mut c, size) = Client::go(&s.sock, "data");
    const N: u64 = 20_000;
    let mut burst = Vec::new();
    for i in 0..N {
        let r = Request {
            flags: 0,
            kind: proto::CMD_READ,
            handle: i,
            offset: size,
            len: 4096,
        };
        burst.extend_from_slice(&proto::encode_request(&r));
    }
    let bye = Request {
        flags: 0,
        kind: proto::CMD_DISC,
        handle: N,
        offset: 0,
        len: 0,
    };
    burst.extend_from_slice(&proto::encode_request(&bye));
    // The server stops reading while its replies wait: the writing may
    // block, so it runs aside.
    let mut w = c.s.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&burst).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    // Replies may come in any order.
    let mut seen: Vec<u64> = (0..N)
        .map(|_| {
            let (err, h) = c.reply();
            assert_eq!(err, proto::EINVAL, "reply to {h}");
            h
        })
        .collect();
    writer.join().unwrap();
    seen.sort_unstable();
    assert_eq!(seen, (0..N).collect::<Vec<_>>());
    assert!(c.closed(), "the server closes after the goodbye");
    assert_eq!(s.stop().0, 0);
}

#[test]
fn sigterm_answers_writes_in_flight_flushes_and_exits_zero() {
    let sb = Sandbox::new();
    mirror_group(&sb, 96, 16);
    let s = Served::start(&sb, &[], &[]);
    let (mut c, _) = Client::go(&s.sock, "data");
    for i in 0..64u64 {
        c.send(proto::CMD_WRITE, 0, i, i * 65536, 65536, &pattern(65536, i));
    }
    s.signal(libc::SIGTERM);
    // Every write the server took is answered before it closes.
    let mut answered = Vec::new();
    let mut h = [0u8; 16];
    while c.s.read_exact(&mut h).is_ok() {
        assert_eq!(be32(&h[4..]), 0);
        answered.push(u64::from_be_bytes(h[8..].try_into().unwrap()));
    }
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("stopped; every volume is flushed"), "{log}");
    assert!(!s_sock_exists(&sb), "the socket file is removed");
    let data = sb.read_volume("data");
    for i in answered {
        let at = (i * 65536) as usize;
        assert!(
            data[at..at + 65536] == pattern(65536, i)[..],
            "write {i} lost"
        );
    }
}

fn s_sock_exists(sb: &Sandbox) -> bool {
    sb.path("nbd.sock").exists()
}

#[test]
fn a_taken_address_is_refused_in_one_sentence() {
    let sb = Sandbox::new();
    mirror_group(&sb, 96, 16);
    let s = Served::start(&sb, &["127.0.0.1:0"], &[]);
    let tcp = s.addrs[1].clone();
    // The same Unix socket, then the same TCP port.
    let sock = format!("unix:{}", s.sock.display());
    sb.mv(&["serve", "--listen", &sock])
        .refused("already in use");
    sb.mv(&["serve", "--listen", &tcp])
        .refused("already in use");
    sb.mv(&["serve", "--listen", "nonsense"])
        .refused("nonsense");
    assert_eq!(s.stop().0, 0);
}

#[test]
fn a_client_that_stops_reading_its_replies_holds_up_no_other_client() {
    let (_sb, s) = served(&[]);
    // A asks for 16 MiB of reads, many times over, and never reads a reply.
    let (a, _) = Client::go(&s.sock, "data");
    flood_reads(&a, 400, MIB);
    std::thread::sleep(Duration::from_millis(500));
    // B reads and writes as if A were not there.
    let started = std::time::Instant::now();
    let (mut b, _) = Client::go(&s.sock, "data");
    for i in 0..64u64 {
        assert_eq!(b.write(100 + i, i * 65536, &pattern(65536, i)), 0);
        assert_eq!(
            b.read(200 + i, i * 65536, 65536).unwrap(),
            pattern(65536, i)
        );
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "B took {took:?} while A did not read its replies"
    );
    drop(a);
    assert_eq!(s.stop().0, 0);
}

/// A line of `/proc/PID/status` ("VmRSS", "Threads"), as a number.
fn proc_status(pid: i32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// The NBD clients of volume `data`, as `status` counts them.
fn clients(sb: &Sandbox) -> u64 {
    let st = sb.status();
    common::volume(&st, "data")["clients"].as_u64().unwrap_or(0)
}

#[test]
fn a_client_that_never_reads_its_replies_keeps_the_server_within_its_memory_bound() {
    let sb = Sandbox::new();
    mirror_group(&sb, 160, 64);
    let s = Served::start(&sb, &[], &[]);
    let before_kib = proc_status(s.pid(), "VmRSS");
    // 128 reads of 32 MiB (4 GiB of replies), none of them ever read.
    let (a, _) = Client::go(&s.sock, "data");
    flood_reads(&a, 128, 32 * MIB);
    std::thread::sleep(Duration::from_secs(3));
    let grew_mib = proc_status(s.pid(), "VmRSS").saturating_sub(before_kib) / 1024;
    eprintln!("serve grew by {grew_mib} MiB");
    // Its share: 128 MiB of replies in flight, the socket's buffers besides.
    assert!(
        grew_mib < 192,
        "serve grew by {grew_mib} MiB for one client that reads nothing"
    );
    // Another client is served at once meanwhile.
    let (mut b, _) = Client::go(&s.sock, "data");
    assert_eq!(b.read(1, 0, 4096).map(|d| d.len()), Ok(4096));
    drop(a);
    assert_eq!(s.stop().0, 0);
}

#[test]
fn five_hundred_idle_connections_leave_a_new_client_served_at_once() {
    let (sb, s) = served(&[]);
    // 500 connections that never say a word.
    let idle: Vec<UnixStream> = (0..500)
        .map(|_| UnixStream::connect(&s.sock).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let started = std::time::Instant::now();
    let (mut c, _) = Client::go(&s.sock, "data");
    assert_eq!(c.write(1, 0, &pattern(4096, 5)), 0);
    assert_eq!(c.read(2, 0, 4096).unwrap(), pattern(4096, 5));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "a new client took {took:?}");
    // The idle ones hold at most the handshake slots' threads.
    let threads = proc_status(s.pid(), "Threads");
    eprintln!("a new client took {took:?}; serve runs {threads} threads");
    assert!(
        threads < 200,
        "serve runs {threads} threads for 500 idle connections"
    );
    assert_eq!(clients(&sb), 1, "only the new client is a client of data");
    drop(idle);
    drop(c);
    assert_eq!(s.stop().0, 0);
}

#[test]
fn a_client_silent_in_its_handshake_is_cut_at_the_handshake_timeout() {
    let sb = Sandbox::new();
    mirror_group(&sb, 96, 16);
    let s = Served::start_args(&sb, &["--handshake-timeout", "1"], &[]);
    // Reads the greeting, sends its flags, then one byte of an option
    // every 300 ms: trickling does not stretch the deadline.
    let mut c = Client::connect(&s.sock, 3);
    let started = std::time::Instant::now();
    let mut w = c.s.try_clone().unwrap();
    std::thread::spawn(move || {
        for b in proto::IHAVEOPT.to_be_bytes() {
            if w.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    assert!(c.closed(), "the server closed the connection");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(4),
        "cut after {took:?}, the handshake timeout is 1 s"
    );
    assert_eq!(s.stop().0, 0);
}

#[test]
fn a_client_that_stops_reading_is_cut_at_the_client_timeout() {
    let sb = Sandbox::new();
    mirror_group(&sb, 96, 16);
    let s = Served::start_args(&sb, &["--client-timeout", "2"], &[]);
    let (a, _) = Client::go(&s.sock, "data");
    let started = std::time::Instant::now();
    flood_reads(&a, 400, MIB);
    assert_eq!(clients(&sb), 1);
    while clients(&sb) > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "a client that reads nothing was not cut within 8 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "cut after {took:?}, before the 2 s client timeout"
    );
    drop(a);
    assert_eq!(s.stop().0, 0);
}

/// Structured replies and block status as a client negotiates them: the
/// contexts listed and selected, reads in hole and data chunks that carry
/// the right bytes, `DF` in one chunk, errors with a message, both
/// contexts' extents, `REQ_ONE`, `CACHE`, and `FAST_ZERO` refused where
/// zeroing would cost a write.
#[test]
fn structured_replies_and_block_status_tell_holes_data_and_dirty_regions() {
    let (sb, s) = served(&[]);
    let mut c = Client::connect(&s.sock, 3);
    // SET before structured replies: invalid.
    assert_eq!(
        c.meta(proto::OPT_SET_META_CONTEXT, "data", &["base:allocation"]),
        Err(proto::REP_ERR_INVALID)
    );
    c.option(proto::OPT_STRUCTURED_REPLY, b"");
    assert_eq!(c.option_reply().1, proto::REP_ACK);
    let all = c.meta(proto::OPT_LIST_META_CONTEXT, "data", &[]).unwrap();
    let names: Vec<&str> = all.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(names, ["base:allocation", "mirrorvol:dirty"]);
    let ours = c
        .meta(proto::OPT_LIST_META_CONTEXT, "data", &["mirrorvol:"])
        .unwrap();
    assert_eq!(ours.len(), 1);
    assert_eq!(
        c.meta(proto::OPT_SET_META_CONTEXT, "nosuch", &["base:allocation"]),
        Err(proto::REP_ERR_UNKNOWN)
    );
    let set = c
        .meta(
            proto::OPT_SET_META_CONTEXT,
            "data",
            &["base:allocation", "x-other:thing", "mirrorvol:dirty"],
        )
        .unwrap();
    assert_eq!(set.len(), 2, "{set:?}");
    let id_of = |name: &str| set.iter().find(|(_, n)| n == name).unwrap().0;
    let (alloc, dirty) = (id_of("base:allocation"), id_of("mirrorvol:dirty"));
    assert_ne!(alloc, dirty);
    c.option(proto::OPT_GO, &Client::info_data("data", &[]));
    let mut flags = 0;
    loop {
        let (_, kind, data) = c.option_reply();
        match kind {
            proto::REP_INFO if u16::from_be_bytes([data[0], data[1]]) == proto::INFO_EXPORT => {
                flags = u16::from_be_bytes([data[10], data[11]]);
            }
            proto::REP_INFO => {}
            proto::REP_ACK => break,
            other => panic!("GO answered {other:#x}"),
        }
    }
    for f in [
        proto::FLAG_SEND_DF,
        proto::FLAG_SEND_CACHE,
        proto::FLAG_SEND_FAST_ZERO,
        proto::FLAG_CAN_MULTI_CONN,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x} in {flags:#x}");
    }

    // 1 MiB of data at 4 MiB of a fresh 16 MiB volume (its plexes are
    // sparse files).
    let data = pattern(MIB as usize, 5);
    assert_eq!(c.write(1, 4 * MIB, &data), 0);
    let st = c.block_status(2, 0, 0, (16 * MIB) as u32).unwrap();
    assert_eq!(st.len(), 2);
    let (_, a) = st.iter().find(|(id, _)| *id == alloc).unwrap();
    let hole = proto::STATE_HOLE | proto::STATE_ZERO;
    assert_eq!(
        a,
        &vec![
            ((4 * MIB) as u32, hole),
            (MIB as u32, 0),
            ((11 * MIB) as u32, hole)
        ],
        "base:allocation"
    );
    let (_, d) = st.iter().find(|(id, _)| *id == dirty).unwrap();
    assert_eq!(d.iter().map(|e| u64::from(e.0)).sum::<u64>(), 16 * MIB);
    // The region just written is dirty in the write-intent bitmap.
    let mut pos = 0u64;
    let mut dirty_at_write = false;
    for &(n, f) in d {
        if f & 1 != 0 && pos <= 4 * MIB && 4 * MIB < pos + u64::from(n) {
            dirty_at_write = true;
        }
        pos += u64::from(n);
    }
    assert!(dirty_at_write, "mirrorvol:dirty: {d:?}");
    // REQ_ONE: one extent each, within the length asked.
    let one = c
        .block_status(3, proto::CMD_FLAG_REQ_ONE, 3 * MIB, (2 * MIB) as u32)
        .unwrap();
    for (_, e) in &one {
        assert_eq!(e.len(), 1);
        assert!(e[0].0 as u64 <= 2 * MIB);
    }
    let (_, a1) = one.iter().find(|(id, _)| *id == alloc).unwrap();
    assert_eq!(a1[0], (MIB as u32, hole));

    // A read over hole and data: hole chunks and a data chunk, right bytes.
    let (got, nd, nh) = c.read_structured(4, 0, 3 * MIB, (3 * MIB) as u32).unwrap();
    assert_eq!((nd, nh), (1, 2));
    assert!(got[..MIB as usize].iter().all(|&b| b == 0));
    assert_eq!(&got[MIB as usize..2 * MIB as usize], &data[..]);
    assert!(got[2 * MIB as usize..].iter().all(|&b| b == 0));
    // DF: the same bytes in one data chunk.
    let (whole, nd, nh) = c
        .read_structured(5, proto::CMD_FLAG_DF, 3 * MIB, (3 * MIB) as u32)
        .unwrap();
    assert_eq!((nd, nh), (1, 0));
    assert_eq!(whole, got);
    // All hole: no data chunk at all.
    let (zeroes, nd, _) = c.read_structured(6, 0, 8 * MIB, MIB as u32).unwrap();
    assert_eq!(nd, 0);
    assert!(zeroes.iter().all(|&b| b == 0));
    // A read of no bytes: the final NONE chunk alone (a content chunk
    // carries at least one byte).
    let (empty, nd, nh) = c.read_structured(21, 0, 4 * MIB, 0).unwrap();
    assert_eq!((empty.len(), nd, nh), (0, 0, 0));
    // A small read is one data chunk.
    let (small, nd, nh) = c.read_structured(7, 0, 4 * MIB, 4096).unwrap();
    assert_eq!((nd, nh), (1, 0));
    assert_eq!(&small[..], &data[..4096]);
    // Errors come as error chunks with a message, even a refused read.
    let (errno, msg) = c.read_structured(8, 0, 16 * MIB, 4096).unwrap_err();
    assert_eq!(errno, proto::EINVAL);
    assert!(msg.contains("past the end"), "{msg}");
    assert_eq!(c.block_status(9, 0, 16 * MIB, 4096), Err(proto::EINVAL));

    // CACHE succeeds; FAST_ZERO without a hole allowed is refused at once
    // (zeroing that keeps the blocks may cost a write), and punching is
    // cheap on image files.
    c.send(proto::CMD_CACHE, 0, 10, 0, MIB as u32, &[]);
    assert_eq!(c.reply(), (0, 10));
    c.send(
        proto::CMD_WRITE_ZEROES,
        proto::CMD_FLAG_FAST_ZERO | proto::CMD_FLAG_NO_HOLE,
        11,
        4 * MIB,
        4096,
        &[],
    );
    let chunks = c.chunks(11);
    assert_eq!(chunks[0].0, proto::REPLY_TYPE_ERROR);
    assert_eq!(be32(&chunks[0].1), proto::ENOTSUP);
    assert_eq!(
        c.read_structured(12, 0, 4 * MIB, 4096).unwrap().0,
        &data[..4096]
    );
    c.send(
        proto::CMD_WRITE_ZEROES,
        proto::CMD_FLAG_FAST_ZERO,
        13,
        4 * MIB,
        MIB as u32,
        &[],
    );
    assert_eq!(c.reply(), (0, 13));
    // Zeroed by a punched hole: a hole again.
    let st = c.block_status(14, 0, 0, (16 * MIB) as u32).unwrap();
    let (_, a) = st.iter().find(|(id, _)| *id == alloc).unwrap();
    assert_eq!(a, &vec![((16 * MIB) as u32, hole)]);
    // NO_HOLE zeroes keep the blocks on both plexes (the filesystem may
    // keep them as unwritten extents, which it reports as holes); a trim
    // gives them back.
    assert_eq!(c.write(15, 8 * MIB, &data), 0);
    c.send(proto::CMD_FLUSH, 0, 19, 0, 0, &[]);
    assert_eq!(c.reply(), (0, 19));
    let blocks = || {
        use std::os::unix::fs::MetadataExt;
        ["a.img", "b.img"].map(|f| {
            std::fs::metadata(sb.path(&format!("disks/{f}")))
                .unwrap()
                .blocks()
                * 512
        })
    };
    let written = blocks();
    c.send(
        proto::CMD_WRITE_ZEROES,
        proto::CMD_FLAG_NO_HOLE,
        16,
        8 * MIB,
        MIB as u32,
        &[],
    );
    assert_eq!(c.reply(), (0, 16));
    let kept = blocks();
    for (w, k) in written.iter().zip(kept) {
        assert!(k >= *w, "NO_HOLE zeroing freed blocks: {w} then {k}");
    }
    c.send(proto::CMD_TRIM, 0, 20, 8 * MIB, MIB as u32, &[]);
    assert_eq!(c.reply(), (0, 20));
    for (k, t) in kept.iter().zip(blocks()) {
        assert!(t + MIB <= *k, "a trim freed no blocks: {k} then {t}");
    }
    let (z, _, _) = c.read_structured(18, 0, 8 * MIB, MIB as u32).unwrap();
    assert!(z.iter().all(|&b| b == 0));
    let (code, err) = s.stop();
    assert_eq!(code, 0, "{err}");
}

/// Extended headers (NBD_OPT_EXTENDED_HEADERS), as qemu 10 negotiates them:
/// 32-byte requests and replies that repeat the request's offset, 64-bit
/// effect lengths (a block status and a zeroing over more than 4 GiB), a
/// WRITE with or without `PAYLOAD_LEN`, `NONE` chunks for success, and
/// `BLOCK_STATUS_EXT` extents.
#[test]
fn extended_headers_carry_64_bit_lengths_and_the_request_offset() {
    const GIB: u64 = 1 << 30;
    let sb = Sandbox::new();
    mirror_group(&sb, 5 * 1024 + 96, 5 * 1024);
    let s = Served::start(&sb, &[], &[]);
    let mut c = Client::connect(&s.sock, 3);
    c.option(proto::OPT_EXTENDED_HEADERS, b"");
    assert_eq!(c.option_reply().1, proto::REP_ACK);
    // No way back to structured replies.
    c.option(proto::OPT_STRUCTURED_REPLY, b"");
    assert_eq!(c.option_reply().1, proto::REP_ERR_EXT_HEADER_REQD);
    let set = c
        .meta(proto::OPT_SET_META_CONTEXT, "data", &["base:allocation"])
        .unwrap();
    assert_eq!(set.len(), 1);
    let alloc = set[0].0;
    c.option(proto::OPT_GO, &Client::info_data("data", &[]));
    while c.option_reply().1 != proto::REP_ACK {}

    let send = |c: &mut Client, kind, flags, handle, offset, len: u64, data: &[u8]| {
        let r = Request {
            flags,
            kind,
            handle,
            offset,
            len,
        };
        let mut m = proto::encode_extended_request(&r).to_vec();
        m.extend_from_slice(data);
        c.s.write_all(&m).unwrap();
    };
    // Every chunk of one reply: (flags, type, offset field, payload).
    let reply = |c: &mut Client, handle: u64| {
        let mut out = Vec::new();
        loop {
            let mut h = [0u8; 32];
            c.s.read_exact(&mut h).unwrap();
            assert_eq!(be32(&h), proto::EXTENDED_REPLY_MAGIC);
            assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), handle);
            let mut p = vec![0u8; u64::from_be_bytes(h[24..32].try_into().unwrap()) as usize];
            c.s.read_exact(&mut p).unwrap();
            let flags = u16::from_be_bytes([h[4], h[5]]);
            out.push((
                u16::from_be_bytes([h[6], h[7]]),
                u64::from_be_bytes(h[16..24].try_into().unwrap()),
                p,
            ));
            if flags & proto::REPLY_FLAG_DONE != 0 {
                return out;
            }
        }
    };
    let at = 4 * GIB + MIB;
    let data = pattern(64 * 1024, 8);
    send(
        &mut c,
        proto::CMD_WRITE,
        proto::CMD_FLAG_PAYLOAD_LEN,
        1,
        at,
        data.len() as u64,
        &data,
    );
    let r = reply(&mut c, 1);
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].0, r[0].1), (proto::REPLY_TYPE_NONE, at));
    // qemu's way: no flag, the length is the payload all the same.
    send(
        &mut c,
        proto::CMD_WRITE,
        0,
        2,
        at + 64 * 1024,
        data.len() as u64,
        &data,
    );
    assert_eq!(reply(&mut c, 2)[0].0, proto::REPLY_TYPE_NONE);

    // Block status over all 5 GiB in one request.
    send(&mut c, proto::CMD_BLOCK_STATUS, 0, 3, 0, 5 * GIB, &[]);
    let r = reply(&mut c, 3);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, proto::REPLY_TYPE_BLOCK_STATUS_EXT);
    let p = &r[0].2;
    assert_eq!(be32(p), alloc);
    let n = be32(&p[4..]) as usize;
    let extents: Vec<(u64, u64)> = p[8..]
        .chunks_exact(16)
        .map(|e| {
            (
                u64::from_be_bytes(e[..8].try_into().unwrap()),
                u64::from_be_bytes(e[8..].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(extents.len(), n);
    let hole = u64::from(proto::STATE_HOLE | proto::STATE_ZERO);
    assert_eq!(
        extents,
        [
            (at, hole),
            (128 * 1024, 0),
            (5 * GIB - at - 128 * 1024, hole)
        ]
    );

    // A read over hole and data: chunks whose header repeats the request's
    // offset, data at its own offset.
    let from = at - 64 * 1024;
    send(&mut c, proto::CMD_READ, 0, 4, from, 192 * 1024, &[]);
    let r = reply(&mut c, 4);
    let mut got = vec![0xeeu8; 192 * 1024];
    for (kind, offset, p) in &r {
        assert_eq!(*offset, from);
        let start = (u64::from_be_bytes(p[..8].try_into().unwrap()) - from) as usize;
        match *kind {
            proto::REPLY_TYPE_OFFSET_HOLE => {
                got[start..start + be32(&p[8..]) as usize].fill(0);
            }
            proto::REPLY_TYPE_OFFSET_DATA => {
                got[start..start + p.len() - 8].copy_from_slice(&p[8..]);
            }
            other => panic!("chunk type {other}"),
        }
    }
    assert!(got[..64 * 1024].iter().all(|&b| b == 0));
    assert_eq!(&got[64 * 1024..128 * 1024], &data[..]);
    assert_eq!(&got[128 * 1024..], &data[..]);

    // Zeroing 4.5 GiB in one request (a 64-bit effect length).
    send(
        &mut c,
        proto::CMD_WRITE_ZEROES,
        0,
        5,
        0,
        4 * GIB + GIB / 2,
        &[],
    );
    assert_eq!(reply(&mut c, 5)[0].0, proto::REPLY_TYPE_NONE);
    send(
        &mut c,
        proto::CMD_BLOCK_STATUS,
        proto::CMD_FLAG_REQ_ONE,
        6,
        0,
        5 * GIB,
        &[],
    );
    let r = reply(&mut c, 6);
    let p = &r[0].2;
    assert_eq!(be32(&p[4..]), 1);
    assert_eq!(u64::from_be_bytes(p[8..16].try_into().unwrap()), 5 * GIB);
    // An error: a chunk with the message, after the extended header.
    send(&mut c, proto::CMD_READ, 0, 7, 5 * GIB, 512, &[]);
    let r = reply(&mut c, 7);
    assert_eq!(r[0].0, proto::REPLY_TYPE_ERROR);
    assert_eq!(be32(&r[0].2), proto::EINVAL);
    let (code, err) = s.stop();
    assert_eq!(code, 0, "{err}");
}
