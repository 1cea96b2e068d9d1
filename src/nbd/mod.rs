//! NBD: the protocol codec ([`proto`], pure) and the server ([`server`]).
//! This layer knows nothing of mirrors: it serves anything that implements
//! [`server::Export`].

pub mod proto;
pub mod server;
