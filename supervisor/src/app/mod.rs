//! What the application sees: the request with its CGI variables and body, and the response
//! it answers with. Nothing here knows of runtimes, threads or the scoreboard.

pub(crate) mod request;
pub(crate) mod response;
