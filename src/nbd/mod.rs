//! NBD: the protocol codec ([`proto`], pure), the server ([`server`]) and a
//! small blocking client ([`client`]). This layer knows nothing of mirrors:
//! it serves anything that implements [`server::Export`].

pub mod client;
pub mod conn;
pub mod proto;
pub mod server;
pub mod session;
pub mod tls;
