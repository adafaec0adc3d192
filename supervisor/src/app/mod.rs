//! What the application sees: the request with its CGI variables and body, and the response
//! it answers with. Nothing here knows of runtimes, threads or the scoreboard, and nothing here
//! imports the worker: the one thing the worker must hear of (a body stream about to block) is
//! a hook it installs (`body.rs`).

pub(crate) mod body;
pub(crate) mod http;
pub(crate) mod request;
pub(crate) mod response;
