//! The NBD wire protocol as a pure codec: constants from `doc/proto.md` of
//! the NetworkBlockDevice/nbd project, decoders that turn client bytes into
//! options and requests, and encoders for every server message. No I/O
//! happens here, so the fuzzer and the property tests drive it directly.
//!
//! Decoders take the bytes received so far and answer with
//! [`Decoded::NeedMore`] (the total number of bytes they need), or
//! [`Decoded::Done`] with the value and how many bytes it took, or a
//! [`ProtoError`] for bytes that break the protocol (the connection closes).
//!
//! ```text
//!  handshake   S: NBDMAGIC  IHAVEOPT  u16 handshake flags
//!              C: u32 client flags
//!  option      C: IHAVEOPT  u32 option  u32 length  data[length]
//!  opt. reply  S: 0x3e889045565a9  u32 option  u32 type  u32 length  data
//!  request     C: 0x25609513  u16 flags  u16 type  u64 handle  u64 offset
//!                 u32 length  (data[length] for WRITE)
//!  reply       S: 0x67446698  u32 error  u64 handle  (data for READ)
//!  chunk       S: 0x668e33ef  u16 flags  u16 type  u64 handle  u32 length
//!                 payload[length]   (structured replies, once negotiated)
//! ```

/// `NBDMAGIC`: the first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, also the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// The magic of an option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// `NBD_EXTENDED_REQUEST_MAGIC`.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// `NBD_EXTENDED_REPLY_MAGIC`.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR + 10;

// Information types of NBD_REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// Flags of the `base:allocation` metadata context.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// Error values of a reply (the spec's fixed set).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Bytes of the server's first message.
pub const HANDSHAKE_LEN: usize = 18;
/// Bytes of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes of a request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Bytes of an extended reply chunk header.
pub const EXTENDED_CHUNK_HEADER_LEN: usize = 32;
/// The most bytes a chunk head encoded here takes before its data (an
/// extended `NBD_REPLY_TYPE_OFFSET_HOLE` chunk, whole).
pub const MAX_CHUNK_HEAD_LEN: usize = EXTENDED_CHUNK_HEADER_LEN + 12;
/// The most extents one block status chunk carries (the spec's SHOULD).
pub const MAX_EXTENTS: usize = 1 << 20;
/// The longest option data this server reads. The longest valid option
/// here carries one name of at most 4096 bytes (the spec's string limit)
/// plus a few fields; anything longer is a broken or hostile client.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// The longest string (export name) the spec allows.
pub const MAX_STRING_LEN: usize = 4096;

/// The largest READ or WRITE this server takes, advertised as the maximum
/// block size: 32 MiB, the size the spec says clients may always use.
pub const MAX_REQUEST: u32 = 32 * 1024 * 1024;
/// The minimum block size advertised.
pub const MIN_BLOCK: u32 = 512;
/// The preferred block size advertised.
pub const PREFERRED_BLOCK: u32 = 4096;

/// What a decoder made of the bytes so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    /// At least this many bytes (counted from the start) are needed.
    NeedMore(usize),
    /// The value, and the number of bytes it took.
    Done(T, usize),
}

/// Bytes that break the protocol: the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("the client sent unknown flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("the client sent an option with bad magic {0:#018x}")]
    BadOptionMagic(u64),
    #[error(
        "the client sent option {option} with {len} bytes of data, more than the {MAX_OPTION_LEN} allowed"
    )]
    OptionTooLong { option: u32, len: u32 },
    #[error("the client sent a request with bad magic {0:#010x}")]
    BadRequestMagic(u32),
}

pub(crate) fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub(crate) fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

// ---- handshake ----

/// The server's greeting: fixed newstyle, and no zeroes if the client wants.
pub fn encode_greeting() -> [u8; HANDSHAKE_LEN] {
    let mut out = [0u8; HANDSHAKE_LEN];
    out[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// What the client answered to the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// Decodes the client's 32-bit flags; unknown flags end the session (the
/// spec says the server MUST drop the connection).
pub fn decode_client_flags(buf: &[u8]) -> Result<Decoded<ClientFlags>, ProtoError> {
    if buf.len() < 4 {
        return Ok(Decoded::NeedMore(4));
    }
    let flags = be_u32(buf);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtoError::UnknownClientFlags(flags));
    }
    Ok(Decoded::Done(
        ClientFlags {
            fixed_newstyle: flags & FLAG_C_FIXED_NEWSTYLE != 0,
            no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
        },
        4,
    ))
}

/// One option of the handshake, decoded with its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`: enter transmission with this export.
    ExportName(Vec<u8>),
    Abort,
    List,
    /// `NBD_OPT_INFO` (`go == false`) or `NBD_OPT_GO`.
    Info {
        go: bool,
        name: Vec<u8>,
        requests: Vec<u16>,
    },
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_EXTENDED_HEADERS`.
    ExtendedHeaders,
    /// `NBD_OPT_LIST_META_CONTEXT` (`set == false`) or
    /// `NBD_OPT_SET_META_CONTEXT`: the export and the queries.
    MetaContext {
        set: bool,
        name: Vec<u8>,
        queries: Vec<Vec<u8>>,
    },
    /// A known option whose data is malformed: answer `NBD_REP_ERR_INVALID`.
    Invalid {
        option: u32,
        why: &'static str,
    },
    /// An option this server does not implement: `NBD_REP_ERR_UNSUP`.
    Unsupported(u32),
}

/// Decodes one option: the 16-byte header and its data.
pub fn decode_option(buf: &[u8]) -> Result<Decoded<ClientOption>, ProtoError> {
    if buf.len() < OPTION_HEADER_LEN {
        return Ok(Decoded::NeedMore(OPTION_HEADER_LEN));
    }
    let magic = be_u64(&buf[0..8]);
    if magic != IHAVEOPT {
        return Err(ProtoError::BadOptionMagic(magic));
    }
    let option = be_u32(&buf[8..12]);
    let len = be_u32(&buf[12..16]);
    if len > MAX_OPTION_LEN {
        return Err(ProtoError::OptionTooLong { option, len });
    }
    let total = OPTION_HEADER_LEN + len as usize;
    if buf.len() < total {
        return Ok(Decoded::NeedMore(total));
    }
    let data = &buf[OPTION_HEADER_LEN..total];
    Ok(Decoded::Done(option_from(option, data), total))
}

fn option_from(option: u32, data: &[u8]) -> ClientOption {
    let invalid = |why| ClientOption::Invalid { option, why };
    match option {
        OPT_EXPORT_NAME => ClientOption::ExportName(data.to_vec()),
        OPT_ABORT => ClientOption::Abort,
        OPT_LIST if data.is_empty() => ClientOption::List,
        OPT_LIST => invalid("NBD_OPT_LIST carries no data"),
        OPT_INFO | OPT_GO => {
            if data.len() < 6 {
                return invalid("the option is shorter than its name length and request count");
            }
            let name_len = be_u32(data) as usize;
            if name_len > data.len() - 6 {
                return invalid("the export name runs past the option data");
            }
            if name_len > MAX_STRING_LEN {
                return invalid("the export name is longer than 4096 bytes");
            }
            let name = data[4..4 + name_len].to_vec();
            let rest = &data[4 + name_len..];
            let n = be_u16(rest) as usize;
            if rest.len() != 2 + 2 * n {
                return invalid("the information request count does not match the option length");
            }
            let requests = rest[2..].chunks_exact(2).map(be_u16).collect();
            ClientOption::Info {
                go: option == OPT_GO,
                name,
                requests,
            }
        }
        OPT_STARTTLS if data.is_empty() => ClientOption::StartTls,
        OPT_STARTTLS => invalid("NBD_OPT_STARTTLS carries no data"),
        OPT_STRUCTURED_REPLY if data.is_empty() => ClientOption::StructuredReply,
        OPT_STRUCTURED_REPLY => invalid("NBD_OPT_STRUCTURED_REPLY carries no data"),
        OPT_EXTENDED_HEADERS if data.is_empty() => ClientOption::ExtendedHeaders,
        OPT_EXTENDED_HEADERS => invalid("NBD_OPT_EXTENDED_HEADERS carries no data"),
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => match meta_queries(data) {
            Ok((name, queries)) => ClientOption::MetaContext {
                set: option == OPT_SET_META_CONTEXT,
                name,
                queries,
            },
            Err(why) => invalid(why),
        },
        other => ClientOption::Unsupported(other),
    }
}

/// The export name and queries of a meta context option: a u32 name
/// length and the name, a u32 query count, and each query as a u32 length
/// and the string.
fn meta_queries(data: &[u8]) -> Result<(Vec<u8>, Vec<Vec<u8>>), &'static str> {
    let mut rest = data;
    let name = take_string(&mut rest).ok_or("the export name runs past the option data")?;
    if rest.len() < 4 {
        return Err("the option has no query count");
    }
    let count = be_u32(rest) as usize;
    rest = &rest[4..];
    // Each query takes at least its four length bytes.
    if count > rest.len() / 4 {
        return Err("the query count does not match the option length");
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        queries.push(take_string(&mut rest).ok_or("a query runs past the option data")?);
    }
    if !rest.is_empty() {
        return Err("the option has bytes after its last query");
    }
    Ok((name, queries))
}

/// Takes a u32-length-prefixed string of at most [`MAX_STRING_LEN`] bytes
/// off the front of `rest`; None when it does not fit.
fn take_string(rest: &mut &[u8]) -> Option<Vec<u8>> {
    if rest.len() < 4 {
        return None;
    }
    let n = be_u32(rest) as usize;
    if n > MAX_STRING_LEN || n > rest.len() - 4 {
        return None;
    }
    let s = rest[4..4 + n].to_vec();
    *rest = &rest[4 + n..];
    Some(s)
}

/// An option reply: header and data.
pub fn encode_option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// `NBD_REP_SERVER` for one export of `NBD_OPT_LIST`.
pub fn encode_rep_server(name: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    encode_option_reply(OPT_LIST, REP_SERVER, &data)
}

/// `NBD_REP_INFO` with `NBD_INFO_EXPORT`.
pub fn encode_info_export(option: u32, size: u64, flags: u16) -> Vec<u8> {
    let mut data = Vec::with_capacity(12);
    data.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    data.extend_from_slice(&size.to_be_bytes());
    data.extend_from_slice(&flags.to_be_bytes());
    encode_option_reply(option, REP_INFO, &data)
}

/// `NBD_REP_INFO` with `NBD_INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(option: u32, min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut data = Vec::with_capacity(14);
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    data.extend_from_slice(&min.to_be_bytes());
    data.extend_from_slice(&preferred.to_be_bytes());
    data.extend_from_slice(&max.to_be_bytes());
    encode_option_reply(option, REP_INFO, &data)
}

/// `NBD_REP_INFO` with `NBD_INFO_NAME`.
pub fn encode_info_name(option: u32, name: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(2 + name.len());
    data.extend_from_slice(&INFO_NAME.to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    encode_option_reply(option, REP_INFO, &data)
}

/// `NBD_REP_META_CONTEXT`: one context, with its id.
pub fn encode_meta_context(option: u32, id: u32, name: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&id.to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    encode_option_reply(option, REP_META_CONTEXT, &data)
}

/// The answer to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zero bytes
/// unless the client negotiated `NBD_FLAG_C_NO_ZEROES`.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

// ---- transmission ----

/// A request header as sent (compact or extended: the length is 64 bits
/// in the extended header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u64,
}

impl Request {
    /// Bytes of data that follow this header on the wire: a WRITE's; with
    /// extended headers, also those of any request flagged
    /// `NBD_CMD_FLAG_PAYLOAD_LEN`. (The extension says a WRITE carries the
    /// flag too; qemu 10.0's client sends its writes without it, so a
    /// WRITE's length is its payload either way.)
    pub fn payload_len(&self, extended: bool) -> u64 {
        let payload =
            self.kind == CMD_WRITE || (extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0);
        if payload { self.len } else { 0 }
    }
}

/// Decodes one request header (its WRITE data, if any, follows it).
pub fn decode_request(buf: &[u8]) -> Result<Decoded<Request>, ProtoError> {
    decode_header(buf, REQUEST_MAGIC, REQUEST_LEN)
}

/// Decodes one extended request header (its payload, if any, follows).
pub fn decode_extended_request(buf: &[u8]) -> Result<Decoded<Request>, ProtoError> {
    decode_header(buf, EXTENDED_REQUEST_MAGIC, EXTENDED_REQUEST_LEN)
}

/// Both request headers: magic, flags, type, handle, offset, then the
/// length in what is left of the `n` bytes (32 or 64 bits).
fn decode_header(buf: &[u8], magic: u32, n: usize) -> Result<Decoded<Request>, ProtoError> {
    if buf.len() < n {
        return Ok(Decoded::NeedMore(n));
    }
    let got = be_u32(buf);
    if got != magic {
        return Err(ProtoError::BadRequestMagic(got));
    }
    let len = match n {
        REQUEST_LEN => u64::from(be_u32(&buf[24..28])),
        _ => be_u64(&buf[24..32]),
    };
    let r = Request {
        flags: be_u16(&buf[4..6]),
        kind: be_u16(&buf[6..8]),
        handle: be_u64(&buf[8..16]),
        offset: be_u64(&buf[16..24]),
        len,
    };
    Ok(Decoded::Done(r, n))
}

/// The fields both request headers share, after `magic`.
fn encode_header(r: &Request, magic: u32, out: &mut [u8]) {
    out[0..4].copy_from_slice(&magic.to_be_bytes());
    out[4..6].copy_from_slice(&r.flags.to_be_bytes());
    out[6..8].copy_from_slice(&r.kind.to_be_bytes());
    out[8..16].copy_from_slice(&r.handle.to_be_bytes());
    out[16..24].copy_from_slice(&r.offset.to_be_bytes());
}

/// Encodes an extended request header.
pub fn encode_extended_request(r: &Request) -> [u8; EXTENDED_REQUEST_LEN] {
    let mut out = [0u8; EXTENDED_REQUEST_LEN];
    encode_header(r, EXTENDED_REQUEST_MAGIC, &mut out);
    out[24..32].copy_from_slice(&r.len.to_be_bytes());
    out
}

/// Encodes a request header (tests and the fuzzer build streams with it).
pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut out = [0u8; REQUEST_LEN];
    encode_header(r, REQUEST_MAGIC, &mut out);
    out[24..28].copy_from_slice(&(r.len as u32).to_be_bytes());
    out
}

/// What the handshake settled that changes how requests are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Negotiated {
    /// `NBD_OPT_STRUCTURED_REPLY` (or `NBD_OPT_EXTENDED_HEADERS`) was
    /// acknowledged.
    pub structured: bool,
    /// `NBD_OPT_EXTENDED_HEADERS` was acknowledged: 32-byte requests and
    /// replies, 64-bit lengths.
    pub extended: bool,
    /// Metadata contexts selected for the export in use.
    pub contexts: usize,
}

/// What the server does with a well-formed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
        /// `NBD_CMD_FLAG_DF`: the data goes in one chunk.
        whole: bool,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    /// TRIM and WRITE_ZEROES both make the range read as zeroes on every
    /// copy; only WRITE_ZEROES with `NBD_CMD_FLAG_NO_HOLE` keeps it
    /// allocated (`keep`).
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
        keep: bool,
        /// `NBD_CMD_FLAG_FAST_ZERO`: fail at once unless zeroing is cheap.
        fast: bool,
    },
    /// `NBD_CMD_CACHE`: the client will read the range soon.
    Cache {
        offset: u64,
        len: u64,
    },
    /// `NBD_CMD_BLOCK_STATUS`; `one`: `NBD_CMD_FLAG_REQ_ONE`.
    BlockStatus {
        offset: u64,
        len: u64,
        one: bool,
    },
    Disconnect,
    /// Answer with this error (and, in a structured reply, `why`); for a
    /// WRITE the payload is read and dropped.
    Reject {
        errno: u32,
        why: &'static str,
    },
}

/// Flags each command may carry (FUA is valid on every command once
/// `NBD_FLAG_SEND_FUA` is advertised, and some clients set it on reads).
fn allowed_flags(kind: u16, n: &Negotiated) -> u16 {
    match kind {
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_READ if n.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        // With extended headers a WRITE may say its payload length.
        CMD_WRITE if n.extended => CMD_FLAG_FUA | CMD_FLAG_PAYLOAD_LEN,
        _ => CMD_FLAG_FUA,
    }
}

/// Checks a request against an export of `size` bytes and what the
/// handshake settled, and decides what to do with it. Errors follow the
/// spec: an unknown command or flag, a length over the maximum block size
/// and a block status nobody negotiated get `EINVAL`; a read, cache or
/// block status past the end gets `EINVAL`, a write past the end `ENOSPC`.
pub fn classify(r: &Request, size: u64, n: &Negotiated) -> Command {
    let reject = |errno, why| Command::Reject { errno, why };
    let known = matches!(
        r.kind,
        CMD_READ
            | CMD_WRITE
            | CMD_DISC
            | CMD_FLUSH
            | CMD_TRIM
            | CMD_WRITE_ZEROES
            | CMD_CACHE
            | CMD_BLOCK_STATUS
    );
    if !known {
        return reject(EINVAL, "the server knows no such command");
    }
    if r.flags & !allowed_flags(r.kind, n) != 0 {
        return reject(
            EINVAL,
            "the request carries a flag its command does not take here",
        );
    }
    let fua = r.flags & CMD_FLAG_FUA != 0;
    let in_range = r.offset.checked_add(r.len).is_some_and(|end| end <= size);
    let writes = matches!(r.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    let (offset, len) = (r.offset, r.len);
    match r.kind {
        CMD_DISC => Command::Disconnect,
        CMD_FLUSH => Command::Flush,
        _ if matches!(r.kind, CMD_READ | CMD_WRITE) && r.len > u64::from(MAX_REQUEST) => reject(
            EINVAL,
            "the request is larger than the 32 MiB the server takes at once",
        ),
        CMD_BLOCK_STATUS if n.contexts == 0 => reject(
            EINVAL,
            "no metadata context was selected during the handshake",
        ),
        CMD_BLOCK_STATUS if r.len == 0 => reject(EINVAL, "a block status of no bytes"),
        _ if !in_range && writes => reject(ENOSPC, "the range reaches past the end of the export"),
        _ if !in_range => reject(EINVAL, "the range reaches past the end of the export"),
        CMD_READ => Command::Read {
            offset,
            len: len as u32,
            whole: r.flags & CMD_FLAG_DF != 0,
        },
        CMD_WRITE => Command::Write {
            offset,
            len: len as u32,
            fua,
        },
        CMD_CACHE => Command::Cache { offset, len },
        CMD_BLOCK_STATUS => Command::BlockStatus {
            offset,
            len,
            one: r.flags & CMD_FLAG_REQ_ONE != 0,
        },
        _ => Command::WriteZeroes {
            offset,
            len,
            fua,
            keep: r.kind == CMD_WRITE_ZEROES && r.flags & CMD_FLAG_NO_HOLE != 0,
            fast: r.flags & CMD_FLAG_FAST_ZERO != 0,
        },
    }
}

/// A simple reply header; a successful READ's data follows it.
pub fn encode_simple_reply(errno: u32, handle: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&errno.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out
}

/// How the reply chunks of one request are framed: structured chunk
/// headers (20 bytes), or extended ones (32 bytes, which repeat the
/// request's offset and give a 64-bit length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub handle: u64,
    /// `Some(request offset)` with extended headers.
    pub extended: Option<u64>,
}

/// A chunk head encoded in place: the bytes and how many of them count.
pub type Head = ([u8; MAX_CHUNK_HEAD_LEN], usize);

/// Encodes a chunk header and then `payload` after it into one head (the
/// payload here is the fixed part of a chunk, at most 12 bytes).
fn chunk_head(f: Frame, flags: u16, kind: u16, len: u64, payload: &[u8]) -> Head {
    let mut out = [0u8; MAX_CHUNK_HEAD_LEN];
    let n = match f.extended {
        None => {
            out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            out[16..20].copy_from_slice(&(len as u32).to_be_bytes());
            CHUNK_HEADER_LEN
        }
        Some(offset) => {
            out[0..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
            out[16..24].copy_from_slice(&offset.to_be_bytes());
            out[24..32].copy_from_slice(&len.to_be_bytes());
            EXTENDED_CHUNK_HEADER_LEN
        }
    };
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&f.handle.to_be_bytes());
    out[n..n + payload.len()].copy_from_slice(payload);
    (out, n + payload.len())
}

/// A chunk header with `len` bytes of payload to follow.
pub fn encode_chunk_header(f: Frame, flags: u16, kind: u16, len: u64) -> Head {
    chunk_head(f, flags, kind, len, &[])
}

fn done_flag(done: bool) -> u16 {
    if done { REPLY_FLAG_DONE } else { 0 }
}

/// The head of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk: `len` bytes of data
/// at `offset` follow it.
pub fn encode_data_chunk(f: Frame, offset: u64, len: u32, done: bool) -> Head {
    let kind = REPLY_TYPE_OFFSET_DATA;
    chunk_head(
        f,
        done_flag(done),
        kind,
        u64::from(len) + 8,
        &offset.to_be_bytes(),
    )
}

/// An `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: `len` bytes at `offset` read as
/// zeroes.
pub fn encode_hole_chunk(f: Frame, offset: u64, len: u32, done: bool) -> Head {
    let mut p = [0u8; 12];
    p[..8].copy_from_slice(&offset.to_be_bytes());
    p[8..].copy_from_slice(&len.to_be_bytes());
    chunk_head(f, done_flag(done), REPLY_TYPE_OFFSET_HOLE, 12, &p)
}

/// The final `NBD_REPLY_TYPE_NONE` chunk.
pub fn encode_none_chunk(f: Frame) -> Head {
    chunk_head(f, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0, &[])
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk with a message for the user (cut
/// at [`MAX_STRING_LEN`] bytes, on a character boundary).
pub fn encode_error_chunk(f: Frame, errno: u32, message: &str) -> Vec<u8> {
    let mut cut = message.len().min(MAX_STRING_LEN);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let message = &message.as_bytes()[..cut];
    let mut p = [0u8; 6];
    p[..4].copy_from_slice(&errno.to_be_bytes());
    p[4..].copy_from_slice(&(message.len() as u16).to_be_bytes());
    let (head, n) = chunk_head(
        f,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + message.len() as u64,
        &p,
    );
    let mut out = Vec::with_capacity(n + message.len());
    out.extend_from_slice(&head[..n]);
    out.extend_from_slice(message);
    out
}

/// A block status chunk for one context: each extent is (length, flags),
/// at most [`MAX_EXTENTS`] of them. `NBD_REPLY_TYPE_BLOCK_STATUS` with
/// 32-bit lengths (each must fit), or with extended headers
/// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` with 64-bit ones.
pub fn encode_block_status(f: Frame, context: u32, extents: &[(u64, u32)], done: bool) -> Vec<u8> {
    let extents = &extents[..extents.len().min(MAX_EXTENTS)];
    let mut body = Vec::with_capacity(8 + 16 * extents.len());
    body.extend_from_slice(&context.to_be_bytes());
    let kind = match f.extended {
        None => {
            for (l, flags) in extents {
                body.extend_from_slice(&(*l as u32).to_be_bytes());
                body.extend_from_slice(&flags.to_be_bytes());
            }
            REPLY_TYPE_BLOCK_STATUS
        }
        Some(_) => {
            body.extend_from_slice(&(extents.len() as u32).to_be_bytes());
            for (l, flags) in extents {
                body.extend_from_slice(&l.to_be_bytes());
                body.extend_from_slice(&u64::from(*flags).to_be_bytes());
            }
            REPLY_TYPE_BLOCK_STATUS_EXT
        }
    };
    let (head, n) = encode_chunk_header(f, done_flag(done), kind, body.len() as u64);
    let mut out = Vec::with_capacity(n + body.len());
    out.extend_from_slice(&head[..n]);
    out.extend_from_slice(&body);
    out
}

/// The NBD error value for an I/O error: the one place errors become wire
/// codes.
pub fn errno_of(e: &std::io::Error) -> u32 {
    // The disk's own errno, however deeply the layers above wrapped it.
    match crate::disk::os_error(e) {
        Some(libc::EPERM) | Some(libc::EROFS) => EPERM,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ENOSPC,
        Some(libc::ENOMEM) => ENOMEM,
        Some(libc::EINVAL) => EINVAL,
        Some(libc::EOVERFLOW) => EOVERFLOW,
        Some(libc::ESHUTDOWN) => ESHUTDOWN,
        Some(_) => EIO,
        None => match e.kind() {
            std::io::ErrorKind::InvalidInput => EINVAL,
            std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => EPERM,
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => ENOSPC,
            _ => EIO,
        },
    }
}

/// Everything a client stream of bytes decodes to, for the fuzzer and the
/// property tests: runs the handshake decoders, then the request decoder,
/// skipping WRITE payloads, until the bytes end or break the protocol.
/// Returns the number of messages decoded.
pub fn decode_stream(mut buf: &[u8], size: u64) -> usize {
    let mut n = 0;
    match decode_client_flags(buf) {
        Ok(Decoded::Done(_, used)) => buf = &buf[used..],
        _ => return n,
    }
    let mut negotiated = Negotiated::default();
    loop {
        match decode_option(buf) {
            Ok(Decoded::Done(opt, used)) => {
                n += 1;
                buf = &buf[used..];
                match opt {
                    ClientOption::ExportName(_) | ClientOption::Info { go: true, .. } => break,
                    // What follows is TLS, not NBD.
                    ClientOption::Abort | ClientOption::StartTls => return n,
                    ClientOption::StructuredReply => negotiated.structured = true,
                    ClientOption::ExtendedHeaders => {
                        negotiated.structured = true;
                        negotiated.extended = true;
                    }
                    ClientOption::MetaContext {
                        set: true, queries, ..
                    } => negotiated.contexts = queries.len(),
                    _ => {}
                }
            }
            _ => return n,
        }
    }
    let decode = if negotiated.extended {
        decode_extended_request
    } else {
        decode_request
    };
    loop {
        match decode(buf) {
            Ok(Decoded::Done(r, used)) => {
                n += 1;
                let _ = classify(&r, size, &negotiated);
                let skip = used.saturating_add(
                    r.payload_len(negotiated.extended).min(usize::MAX as u64) as usize,
                );
                if skip > buf.len() {
                    return n;
                }
                buf = &buf[skip..];
            }
            _ => return n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn option(opt: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
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

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    const PLAIN: Negotiated = Negotiated {
        structured: false,
        extended: false,
        contexts: 0,
    };
    const RICH: Negotiated = Negotiated {
        structured: true,
        extended: false,
        contexts: 2,
    };
    const EXTENDED: Negotiated = Negotiated {
        structured: true,
        extended: true,
        contexts: 1,
    };

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            kind,
            handle: 7,
            offset,
            len: len.into(),
        }
    }

    #[test]
    fn greeting_is_nbdmagic_ihaveopt_and_fixed_newstyle() {
        let g = encode_greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(be_u16(&g[16..]), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    }

    #[test]
    fn client_flags_need_four_bytes_and_refuse_unknown_bits() {
        assert_eq!(decode_client_flags(&[0, 0]), Ok(Decoded::NeedMore(4)));
        assert_eq!(
            decode_client_flags(&[0, 0, 0, 3]),
            Ok(Decoded::Done(
                ClientFlags {
                    fixed_newstyle: true,
                    no_zeroes: true
                },
                4
            ))
        );
        assert_eq!(
            decode_client_flags(&[0, 0, 0, 4]),
            Err(ProtoError::UnknownClientFlags(4))
        );
    }

    #[test]
    fn options_decode_after_enough_bytes() {
        let bytes = option(OPT_GO, &info_data("data", &[INFO_BLOCK_SIZE]));
        for cut in 0..bytes.len() {
            assert!(matches!(
                decode_option(&bytes[..cut]),
                Ok(Decoded::NeedMore(n)) if n > cut
            ));
        }
        assert_eq!(
            decode_option(&bytes),
            Ok(Decoded::Done(
                ClientOption::Info {
                    go: true,
                    name: b"data".to_vec(),
                    requests: vec![INFO_BLOCK_SIZE]
                },
                bytes.len()
            ))
        );
    }

    #[test]
    fn every_option_kind_decodes() {
        let d = |b: Vec<u8>| match decode_option(&b) {
            Ok(Decoded::Done(o, _)) => o,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            d(option(OPT_EXPORT_NAME, b"v")),
            ClientOption::ExportName(b"v".to_vec())
        );
        assert_eq!(d(option(OPT_ABORT, b"")), ClientOption::Abort);
        assert_eq!(d(option(OPT_LIST, b"")), ClientOption::List);
        assert!(matches!(
            d(option(OPT_LIST, b"x")),
            ClientOption::Invalid { .. }
        ));
        assert!(matches!(
            d(option(OPT_INFO, &info_data("a", &[]))),
            ClientOption::Info { go: false, .. }
        ));
        assert_eq!(
            d(option(OPT_STRUCTURED_REPLY, b"")),
            ClientOption::StructuredReply
        );
        assert_eq!(
            d(option(OPT_EXTENDED_HEADERS, b"")),
            ClientOption::ExtendedHeaders
        );
        assert!(matches!(
            d(option(OPT_STRUCTURED_REPLY, b"x")),
            ClientOption::Invalid { .. }
        ));
        assert_eq!(d(option(OPT_STARTTLS, b"")), ClientOption::StartTls);
        assert_eq!(
            d(option(
                OPT_SET_META_CONTEXT,
                &meta_data("v", &["base:allocation", "mirrorvol:"])
            )),
            ClientOption::MetaContext {
                set: true,
                name: b"v".to_vec(),
                queries: vec![b"base:allocation".to_vec(), b"mirrorvol:".to_vec()]
            }
        );
        assert!(matches!(
            d(option(OPT_LIST_META_CONTEXT, &meta_data("", &[]))),
            ClientOption::MetaContext { set: false, .. }
        ));
        assert_eq!(d(option(99, b"abc")), ClientOption::Unsupported(99));
    }

    #[test]
    fn malformed_info_is_invalid_not_fatal() {
        let d = |data: &[u8]| match decode_option(&option(OPT_INFO, data)) {
            Ok(Decoded::Done(o, _)) => o,
            other => panic!("{other:?}"),
        };
        assert!(matches!(d(&[0, 0, 0]), ClientOption::Invalid { .. }));
        // Name length past the end.
        assert!(matches!(
            d(&[0, 0, 0, 9, b'a', 0, 0]),
            ClientOption::Invalid { .. }
        ));
        // Request count that does not match.
        let mut bad = info_data("a", &[1, 2]);
        bad.pop();
        assert!(matches!(d(&bad), ClientOption::Invalid { .. }));
    }

    #[test]
    fn bad_option_magic_and_huge_options_end_the_session() {
        let mut b = option(OPT_LIST, b"");
        b[0] ^= 1;
        assert!(matches!(
            decode_option(&b),
            Err(ProtoError::BadOptionMagic(_))
        ));
        let mut h = IHAVEOPT.to_be_bytes().to_vec();
        h.extend_from_slice(&OPT_LIST.to_be_bytes());
        h.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode_option(&h),
            Err(ProtoError::OptionTooLong { .. })
        ));
    }

    #[test]
    fn option_replies_encode_header_and_data() {
        let r = encode_option_reply(OPT_LIST, REP_ACK, &[]);
        assert_eq!(r.len(), 20);
        assert_eq!(be_u64(&r), REPLY_MAGIC);
        assert_eq!(be_u32(&r[8..]), OPT_LIST);
        assert_eq!(be_u32(&r[12..]), REP_ACK);
        assert_eq!(be_u32(&r[16..]), 0);

        let s = encode_rep_server("data");
        assert_eq!(be_u32(&s[12..]), REP_SERVER);
        assert_eq!(be_u32(&s[16..]), 8);
        assert_eq!(be_u32(&s[20..]), 4);
        assert_eq!(&s[24..], b"data");

        let e = encode_info_export(OPT_GO, 1 << 30, 0x1ed);
        assert_eq!(be_u32(&e[12..]), REP_INFO);
        assert_eq!(be_u32(&e[16..]), 12);
        assert_eq!(be_u16(&e[20..]), INFO_EXPORT);
        assert_eq!(be_u64(&e[22..]), 1 << 30);
        assert_eq!(be_u16(&e[30..]), 0x1ed);

        let b = encode_info_block_size(OPT_INFO, 512, 4096, MAX_REQUEST);
        assert_eq!(be_u32(&b[16..]), 14);
        assert_eq!(be_u16(&b[20..]), INFO_BLOCK_SIZE);
        assert_eq!(be_u32(&b[22..]), 512);
        assert_eq!(be_u32(&b[26..]), 4096);
        assert_eq!(be_u32(&b[30..]), MAX_REQUEST);

        let n = encode_info_name(OPT_GO, "v");
        assert_eq!(be_u32(&n[16..]), 3);
        assert_eq!(be_u16(&n[20..]), INFO_NAME);

        let u = encode_option_reply(42, REP_ERR_UNSUP, b"no");
        assert_eq!(be_u32(&u[8..]), 42);
        assert_eq!(be_u32(&u[12..]), 0x8000_0001);
        assert_eq!(REP_ERR_UNKNOWN, 0x8000_0006);
        assert_eq!(REP_ERR_INVALID, 0x8000_0003);
    }

    #[test]
    fn export_name_reply_pads_unless_no_zeroes() {
        assert_eq!(encode_export_name_reply(1, 1, false).len(), 134);
        let r = encode_export_name_reply(4096, 3, true);
        assert_eq!(r.len(), 10);
        assert_eq!(be_u64(&r), 4096);
        assert_eq!(be_u16(&r[8..]), 3);
    }

    #[test]
    fn requests_round_trip_and_bad_magic_is_fatal() {
        let r = req(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        let b = encode_request(&r);
        assert_eq!(decode_request(&b[..27]), Ok(Decoded::NeedMore(28)));
        assert_eq!(decode_request(&b), Ok(Decoded::Done(r, 28)));
        assert_eq!(r.payload_len(false), 512);
        assert_eq!(req(CMD_READ, 0, 0, 512).payload_len(false), 0);
        // Extended: the flag says whether a payload follows, 64-bit lengths.
        let x = Request {
            flags: CMD_FLAG_PAYLOAD_LEN,
            kind: CMD_WRITE,
            handle: 3,
            offset: 1 << 40,
            len: 4096,
        };
        let b = encode_extended_request(&x);
        assert_eq!(decode_extended_request(&b[..31]), Ok(Decoded::NeedMore(32)));
        assert_eq!(decode_extended_request(&b), Ok(Decoded::Done(x, 32)));
        assert_eq!(x.payload_len(true), 4096);
        let z = Request {
            flags: 0,
            kind: CMD_WRITE_ZEROES,
            handle: 4,
            offset: 0,
            len: 5 << 32,
        };
        assert_eq!(
            decode_extended_request(&encode_extended_request(&z)),
            Ok(Decoded::Done(z, 32))
        );
        assert_eq!(z.payload_len(true), 0);
        assert!(matches!(
            decode_extended_request(&encode_request(&r)[..]),
            Err(_) | Ok(Decoded::NeedMore(_))
        ));
        let mut bad = b;
        bad[3] ^= 0xff;
        assert!(matches!(
            decode_request(&bad),
            Err(ProtoError::BadRequestMagic(_))
        ));
    }

    #[test]
    fn classify_accepts_in_range_requests() {
        let size = 1 << 20;
        assert_eq!(
            classify(&req(CMD_READ, 0, 0, 4096), size, &PLAIN),
            Command::Read {
                offset: 0,
                len: 4096,
                whole: false
            }
        );
        assert_eq!(
            classify(&req(CMD_WRITE, CMD_FLAG_FUA, size - 512, 512), size, &PLAIN),
            Command::Write {
                offset: size - 512,
                len: 512,
                fua: true
            }
        );
        assert_eq!(
            classify(&req(CMD_FLUSH, 0, 0, 0), size, &PLAIN),
            Command::Flush
        );
        assert_eq!(
            classify(&req(CMD_DISC, 0, 0, 0), size, &PLAIN),
            Command::Disconnect
        );
        for (kind, flags) in [
            (CMD_TRIM, 0),
            (CMD_WRITE_ZEROES, 0),
            (CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE),
        ] {
            assert_eq!(
                classify(&req(kind, flags, 0, 8192), size, &PLAIN),
                Command::WriteZeroes {
                    offset: 0,
                    len: 8192,
                    fua: false,
                    keep: kind == CMD_WRITE_ZEROES && flags != 0,
                    fast: false
                }
            );
        }
        // Large zeroing is fine: no payload travels.
        assert!(matches!(
            classify(&req(CMD_WRITE_ZEROES, 0, 0, u32::MAX), 1 << 40, &PLAIN),
            Command::WriteZeroes { .. }
        ));
        // FUA on a read is tolerated (clients are known to set it).
        assert!(matches!(
            classify(&req(CMD_READ, CMD_FLAG_FUA, 0, 512), size, &PLAIN),
            Command::Read { .. }
        ));
    }

    #[test]
    fn classify_rejects_per_the_spec() {
        let size = 1 << 20;
        let e = |errno| errno;
        let rej = |r| match classify(&r, size, &PLAIN) {
            Command::Reject { errno, .. } => errno,
            other => panic!("{other:?}"),
        };
        assert_eq!(rej(req(CMD_READ, 0, size, 512)), e(EINVAL));
        assert_eq!(rej(req(CMD_READ, 0, u64::MAX, 512)), e(EINVAL));
        assert_eq!(rej(req(CMD_WRITE, 0, size - 511, 512)), e(ENOSPC));
        assert_eq!(rej(req(CMD_TRIM, 0, size, 1)), e(ENOSPC));
        assert_eq!(rej(req(CMD_WRITE_ZEROES, 0, u64::MAX, 1)), e(ENOSPC));
        assert!(matches!(
            classify(&req(CMD_READ, 0, 0, MAX_REQUEST + 1), 1 << 40, &PLAIN),
            Command::Reject { errno: EINVAL, .. }
        ));
        assert!(matches!(
            classify(&req(CMD_WRITE, 0, 0, MAX_REQUEST + 1), 1 << 40, &PLAIN),
            Command::Reject { errno: EINVAL, .. }
        ));
        // Block status without a context selected; DF without structured
        // replies.
        assert_eq!(rej(req(CMD_BLOCK_STATUS, 0, 0, 512)), e(EINVAL));
        assert_eq!(rej(req(99, 0, 0, 0)), e(EINVAL));
        assert_eq!(rej(req(CMD_READ, CMD_FLAG_DF, 0, 512)), e(EINVAL));
        assert_eq!(rej(req(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 512)), e(EINVAL));
        assert_eq!(rej(req(CMD_CACHE, 0, size, 1)), e(EINVAL));
        let rich = |r| match classify(&r, size, &RICH) {
            Command::Reject { errno, .. } => errno,
            other => panic!("{other:?}"),
        };
        assert_eq!(rich(req(CMD_BLOCK_STATUS, 0, size, 1)), e(EINVAL));
        assert_eq!(rich(req(CMD_BLOCK_STATUS, 0, 0, 0)), e(EINVAL));
        assert_eq!(rich(req(CMD_CACHE, CMD_FLAG_DF, 0, 1)), e(EINVAL));
        assert_eq!(rich(req(CMD_WRITE, CMD_FLAG_REQ_ONE, 0, 1)), e(EINVAL));
    }

    #[test]
    fn classify_honours_what_was_negotiated() {
        let size = 1 << 20;
        assert_eq!(
            classify(&req(CMD_READ, CMD_FLAG_DF, 0, 512), size, &RICH),
            Command::Read {
                offset: 0,
                len: 512,
                whole: true
            }
        );
        assert_eq!(
            classify(
                &req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 4096, u32::MAX),
                1 << 40,
                &RICH
            ),
            Command::BlockStatus {
                offset: 4096,
                len: u64::from(u32::MAX),
                one: true
            }
        );
        assert_eq!(
            classify(&req(CMD_CACHE, 0, 0, 8192), size, &PLAIN),
            Command::Cache {
                offset: 0,
                len: 8192
            }
        );
        assert_eq!(
            classify(
                &req(
                    CMD_WRITE_ZEROES,
                    CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE,
                    0,
                    512
                ),
                size,
                &PLAIN
            ),
            Command::WriteZeroes {
                offset: 0,
                len: 512,
                fua: false,
                keep: true,
                fast: true
            }
        );
    }

    #[test]
    fn structured_chunks_encode_per_the_spec() {
        let f = Frame {
            handle: 9,
            extended: None,
        };
        let bytes = |(h, n): Head| h[..n].to_vec();
        let d = bytes(encode_data_chunk(f, 4096, 512, true));
        assert_eq!(d.len(), 28);
        assert_eq!(be_u32(&d), STRUCTURED_REPLY_MAGIC);
        assert_eq!(be_u16(&d[4..]), REPLY_FLAG_DONE);
        assert_eq!(be_u16(&d[6..]), REPLY_TYPE_OFFSET_DATA);
        assert_eq!(be_u64(&d[8..]), 9);
        assert_eq!(be_u32(&d[16..]), 520);
        assert_eq!(be_u64(&d[20..]), 4096);
        let h = bytes(encode_hole_chunk(f, 0, 65536, false));
        assert_eq!(h.len(), 32);
        assert_eq!(be_u16(&h[4..]), 0);
        assert_eq!(be_u16(&h[6..]), REPLY_TYPE_OFFSET_HOLE);
        assert_eq!(be_u32(&h[16..]), 12);
        assert_eq!(be_u32(&h[28..]), 65536);
        let n = bytes(encode_none_chunk(Frame { handle: 3, ..f }));
        assert_eq!(n.len(), 20);
        assert_eq!(be_u16(&n[4..]), REPLY_FLAG_DONE);
        assert_eq!(be_u32(&n[16..]), 0);
        let e = encode_error_chunk(f, EIO, "disk gone");
        assert_eq!(be_u16(&e[6..]), REPLY_TYPE_ERROR);
        assert_eq!(be_u32(&e[16..]), 6 + 9);
        assert_eq!(be_u32(&e[20..]), EIO);
        assert_eq!(be_u16(&e[24..]), 9);
        assert_eq!(&e[26..], b"disk gone");
        // A long message is cut at the spec's string limit, on a character.
        let long = "é".repeat(3000);
        let e = encode_error_chunk(f, EIO, &long);
        let n = be_u16(&e[24..]) as usize;
        assert!(n <= MAX_STRING_LEN && std::str::from_utf8(&e[26..26 + n]).is_ok());
        let b = encode_block_status(f, 2, &[(4096, STATE_HOLE | STATE_ZERO), (8192, 0)], true);
        assert_eq!(be_u16(&b[6..]), REPLY_TYPE_BLOCK_STATUS);
        assert_eq!(be_u32(&b[16..]), 4 + 16);
        assert_eq!(be_u32(&b[20..]), 2);
        assert_eq!(be_u32(&b[24..]), 4096);
        assert_eq!(be_u32(&b[28..]), 3);
        assert_eq!(be_u32(&b[32..]), 8192);
        let m = encode_meta_context(OPT_SET_META_CONTEXT, 7, "base:allocation");
        assert_eq!(be_u32(&m[12..]), REP_META_CONTEXT);
        assert_eq!(be_u32(&m[20..]), 7);
        assert_eq!(&m[24..], b"base:allocation");
    }

    #[test]
    fn extended_chunks_carry_the_request_offset_and_64_bit_lengths() {
        let f = Frame {
            handle: 5,
            extended: Some(1 << 33),
        };
        let bytes = |(h, n): Head| h[..n].to_vec();
        let d = bytes(encode_data_chunk(f, (1 << 33) + 512, 512, true));
        assert_eq!(d.len(), 40);
        assert_eq!(be_u32(&d), EXTENDED_REPLY_MAGIC);
        assert_eq!(be_u16(&d[4..]), REPLY_FLAG_DONE);
        assert_eq!(be_u16(&d[6..]), REPLY_TYPE_OFFSET_DATA);
        assert_eq!(be_u64(&d[8..]), 5);
        assert_eq!(be_u64(&d[16..]), 1 << 33);
        assert_eq!(be_u64(&d[24..]), 520);
        assert_eq!(be_u64(&d[32..]), (1 << 33) + 512);
        let h = bytes(encode_hole_chunk(f, 1 << 33, 4096, false));
        assert_eq!(h.len(), 44);
        assert_eq!(be_u64(&h[24..]), 12);
        assert_eq!(be_u32(&h[40..]), 4096);
        let n = bytes(encode_none_chunk(f));
        assert_eq!(
            (n.len(), be_u16(&n[6..]), be_u64(&n[24..])),
            (32, REPLY_TYPE_NONE, 0)
        );
        let e = encode_error_chunk(f, ENOSPC, "full");
        assert_eq!(be_u64(&e[24..]), 10);
        assert_eq!(be_u32(&e[32..]), ENOSPC);
        assert_eq!(&e[38..], b"full");
        let b = encode_block_status(f, 1, &[(5 << 32, 0), (4096, STATE_HOLE)], true);
        assert_eq!(be_u16(&b[6..]), REPLY_TYPE_BLOCK_STATUS_EXT);
        assert_eq!(be_u64(&b[24..]), 8 + 32);
        assert_eq!(be_u32(&b[32..]), 1);
        assert_eq!(be_u32(&b[36..]), 2);
        assert_eq!(be_u64(&b[40..]), 5 << 32);
        assert_eq!(be_u64(&b[48..]), 0);
        assert_eq!(be_u64(&b[56..]), 4096);
        assert_eq!(be_u64(&b[64..]), u64::from(STATE_HOLE));
    }

    #[test]
    fn extended_requests_classify_with_64_bit_lengths() {
        let size = 8 << 30;
        let x = |kind, flags, offset, len| Request {
            flags,
            kind,
            handle: 1,
            offset,
            len,
        };
        assert_eq!(
            classify(&x(CMD_WRITE_ZEROES, 0, 0, 6 << 30), size, &EXTENDED),
            Command::WriteZeroes {
                offset: 0,
                len: 6 << 30,
                fua: false,
                keep: false,
                fast: false
            }
        );
        assert_eq!(
            classify(&x(CMD_BLOCK_STATUS, 0, 0, size), size, &EXTENDED),
            Command::BlockStatus {
                offset: 0,
                len: size,
                one: false
            }
        );
        assert_eq!(
            classify(&x(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 512), size, &EXTENDED),
            Command::Write {
                offset: 0,
                len: 512,
                fua: false
            }
        );
        // A WRITE without the flag is taken too (qemu sends them so).
        assert!(matches!(
            classify(&x(CMD_WRITE, 0, 0, 512), size, &EXTENDED),
            Command::Write { len: 512, .. }
        ));
        assert_eq!(x(CMD_WRITE, 0, 0, 512).payload_len(true), 512);
        // Nothing else has a payload here.
        for r in [
            x(CMD_READ, CMD_FLAG_PAYLOAD_LEN, 0, 512),
            x(CMD_READ, 0, 0, 64 << 20),
        ] {
            assert!(
                matches!(
                    classify(&r, size, &EXTENDED),
                    Command::Reject { errno: EINVAL, .. }
                ),
                "{r:?}"
            );
        }
    }

    #[test]
    fn malformed_meta_context_options_are_invalid() {
        let d = |data: &[u8]| match decode_option(&option(OPT_SET_META_CONTEXT, data)) {
            Ok(Decoded::Done(o, _)) => o,
            other => panic!("{other:?}"),
        };
        let good = meta_data("v", &["base:allocation"]);
        for cut in 0..good.len() {
            assert!(
                matches!(d(&good[..cut]), ClientOption::Invalid { .. }),
                "cut at {cut}"
            );
        }
        let mut extra = good.clone();
        extra.push(0);
        assert!(matches!(d(&extra), ClientOption::Invalid { .. }));
        let mut many = meta_data("v", &[]);
        many[5..9].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(d(&many), ClientOption::Invalid { .. }));
    }

    #[test]
    fn simple_reply_and_errno_mapping() {
        let r = encode_simple_reply(EIO, 0xdead_beef);
        assert_eq!(be_u32(&r), SIMPLE_REPLY_MAGIC);
        assert_eq!(be_u32(&r[4..]), EIO);
        assert_eq!(be_u64(&r[8..]), 0xdead_beef);
        use std::io::{Error, ErrorKind};
        assert_eq!(errno_of(&Error::from_raw_os_error(libc::EIO)), EIO);
        assert_eq!(errno_of(&Error::from_raw_os_error(libc::ENOSPC)), ENOSPC);
        assert_eq!(errno_of(&Error::from_raw_os_error(libc::EDQUOT)), ENOSPC);
        assert_eq!(errno_of(&Error::from_raw_os_error(libc::EROFS)), EPERM);
        assert_eq!(errno_of(&Error::from_raw_os_error(libc::ENXIO)), EIO);
        assert_eq!(errno_of(&Error::new(ErrorKind::InvalidInput, "x")), EINVAL);
        assert_eq!(errno_of(&Error::other("x")), EIO);
        // Wrapped by the layers above, the disk's errno still decides.
        let wrapped = Error::new(
            ErrorKind::StorageFull,
            Error::other(Error::from_raw_os_error(libc::ENOSPC)),
        );
        assert_eq!(errno_of(&wrapped), ENOSPC);
        assert_eq!(
            errno_of(&Error::new(ErrorKind::StorageFull, "full")),
            ENOSPC
        );
    }

    #[test]
    fn stream_decoder_walks_handshake_and_requests() {
        let mut s = vec![0, 0, 0, 1];
        s.extend(option(OPT_LIST, b""));
        s.extend(option(OPT_GO, &info_data("", &[])));
        s.extend(encode_request(&req(CMD_WRITE, 0, 0, 4)));
        s.extend([1, 2, 3, 4]);
        s.extend(encode_request(&req(CMD_READ, 0, 0, 4)));
        assert_eq!(decode_stream(&s, 1 << 20), 4);
        let mut t = vec![0, 0, 0, 1];
        t.extend(option(OPT_STRUCTURED_REPLY, b""));
        t.extend(option(
            OPT_SET_META_CONTEXT,
            &meta_data("", &["base:allocation"]),
        ));
        t.extend(option(OPT_GO, &info_data("", &[])));
        t.extend(encode_request(&req(CMD_BLOCK_STATUS, 0, 0, 4)));
        assert_eq!(decode_stream(&t, 1 << 20), 4);
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary bytes never panic any decoder, and a decoder asks for
        /// more bytes only when it has fewer than it asks for.
        #[test]
        fn arbitrary_bytes_never_panic_the_codec(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode_stream(&bytes, 1 << 30);
            if let Ok(Decoded::NeedMore(n)) = decode_option(&bytes) {
                prop_assert!(n > bytes.len());
            }
            if let Ok(Decoded::NeedMore(n)) = decode_request(&bytes) {
                prop_assert!(n > bytes.len());
            }
            if let Ok(Decoded::Done(_, used)) = decode_option(&bytes) {
                prop_assert!(used <= bytes.len());
            }
        }

        /// Streams built from valid-looking pieces with random fields never
        /// panic, and every classified request is either in range or rejected.
        #[test]
        fn random_requests_are_in_range_or_rejected(
            kind in 0u16..10, flags in any::<u16>(), offset in any::<u64>(),
            len in any::<u32>(), size in 0u64..(1 << 40)
        ) {
            let r = Request { flags, kind, handle: 1, offset, len: len.into() };
            let b = encode_request(&r);
            prop_assert_eq!(decode_request(&b), Ok(Decoded::Done(r, REQUEST_LEN)));
            let n = Negotiated {
                structured: flags & 1 == 0,
                extended: flags & 2 == 0,
                contexts: usize::from(kind % 2),
            };
            match classify(&r, size, &n) {
                Command::Read { offset, len, .. } | Command::Write { offset, len, .. } => {
                    prop_assert!(len <= MAX_REQUEST);
                    prop_assert!(offset + u64::from(len) <= size);
                    prop_assert_eq!(u64::from(len), r.len);
                }
                Command::WriteZeroes { offset, len, .. }
                | Command::Cache { offset, len }
                | Command::BlockStatus { offset, len, .. } => {
                    prop_assert!(offset + len <= size);
                }
                _ => {}
            }
        }
    }
}
