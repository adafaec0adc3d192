//! FastCGI 1.0, the protocol between a web server (nginx, Apache, lighttpd) and an application.
//!
//! # Layout
//! - [`record`]: the 8-byte header, record types, the zero-copy decoder and the encoders.
//! - [`params`]: name-value pairs (1- and 4-byte lengths, binary-safe, duplicates kept).
//! - [`server`]: request assembly for the application side: records in, [`server::Event`]s out,
//!   control records (GET_VALUES answers, refusals) queued for the shell to write.
//! - [`response`]: encoding a response (STDOUT/STDERR records, END_REQUEST) into one buffer.
//! - [`client`]: the web server's side: encode a request, decode a response.
//! - `io` (feature `tokio`): a thin tokio shell: an async client for tests, health checks and load generation.
//! - [`Limits`] and [`Error`]: every bound a peer meets, and every way it can be wrong.
//!
//! The core does no I/O and reads no clock: decoders take `&mut BytesMut` and return
//! `Ok(None)` when they need more bytes; encoders write into a `BufMut`.
//!
//! # No peer can wedge a connection
//! - A connection runs one request at a time unless [`Limits::max_requests_per_conn`] says
//!   more: GET_VALUES answers `FCGI_MPXS_CONNS` 0, and a second concurrent BEGIN_REQUEST is
//!   refused by the core with `FCGI_CANT_MPX_CONN` while the first goes on.
//! - A request whose PARAMS break a limit becomes [`server::Event::Rejected`]: the shell answers
//!   it (for HTTP, with 431), the rest of it is dropped unread, and the connection serves the
//!   next request.
//! - Only a byte stream that cannot be trusted any more is an [`Error`], and closes the
//!   connection.
//!
//! ```
//! use bytes::BytesMut;
//! use fcgi::{client, server::{Event, ServerConnection}, Limits, Params, Role};
//!
//! // A client encodes a request...
//! let mut wire = BytesMut::new();
//! let params = Params::from_pairs([("REQUEST_METHOD", "GET"), ("SCRIPT_NAME", "/hello")]);
//! client::encode_request(1, Role::Responder, true, &params, b"", &mut wire);
//!
//! // ...and the application side assembles it.
//! let mut conn = ServerConnection::new(Limits::default());
//! let Some(Event::Request(req)) = conn.decode(&mut wire)? else { panic!("a request") };
//! assert_eq!(req.params.get_str("SCRIPT_NAME"), Some("/hello"));
//! assert_eq!(conn.decode(&mut wire)?, Some(Event::StdinEnd { id: 1 }));
//! # Ok::<(), fcgi::Error>(())
//! ```
//!
//! # What it does not do
//! It does not interpret CGI: headers, status lines and bodies are the application's business
//! (the `supervisor` crate builds that on top). It does not own sockets beyond the small async
//! client in [`io`].

pub mod client;
mod error;
#[cfg(feature = "tokio")]
pub mod io;
mod limits;
pub mod params;
pub mod record;
pub mod response;
pub mod server;

pub use error::Error;
pub use limits::*;
pub use params::Params;
pub use record::{ProtocolStatus, Role};
