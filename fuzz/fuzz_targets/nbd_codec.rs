//! Feeds arbitrary bytes to the NBD codec: the client-flags, option and
//! request decoders one by one, and a whole client stream (handshake, then
//! requests with their WRITE payloads). Nothing may panic, and a decoder
//! that asks for more bytes must ask for more than it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mirrorvol::nbd::proto::{self, Decoded};

fuzz_target!(|data: &[u8]| {
    let size = data
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        .unwrap_or(1 << 30);
    let _ = proto::decode_stream(data, size);
    if let Ok(Decoded::NeedMore(n)) = proto::decode_option(data) {
        assert!(n > data.len());
    }
    if let Ok(Decoded::Done(_, used)) = proto::decode_option(data) {
        assert!(used <= data.len());
    }
    if let Ok(Decoded::Done(r, _)) = proto::decode_request(data) {
        let _ = proto::classify(&r, size, &proto::Negotiated::default());
        let structured = proto::Negotiated {
            structured: true,
            extended: false,
            contexts: 2,
        };
        let _ = proto::classify(&r, size, &structured);
    }
    if let Ok(Decoded::Done(r, used)) = proto::decode_extended_request(data) {
        assert!(used <= data.len());
        let extended = proto::Negotiated {
            structured: true,
            extended: true,
            contexts: 1,
        };
        let _ = proto::classify(&r, size, &extended);
        let _ = r.payload_len(true);
    }
    let _ = proto::decode_client_flags(data);
});
