//! Bounds on everything a peer controls. Every length from the wire is checked against one of
//! these before anything is allocated.

/// The bounds one connection enforces. `Default` gives values suited to nginx and Apache in front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Total bytes of one request's PARAMS stream.
    pub max_params_bytes: usize,
    /// Name-value pairs in one request's PARAMS stream.
    pub max_params: usize,
    /// Requests running at once on one connection (1 means no multiplexing).
    pub max_requests_per_conn: usize,
    /// Request body bytes a connection buffers before it stops reading the socket.
    pub max_buffered_body: usize,
    /// Connections one server process accepts at once (answered to FCGI_MAX_CONNS).
    pub max_conns: usize,
    /// Requests one server process runs at once (answered to FCGI_MAX_REQS).
    pub max_reqs: usize,
}

/// 256 KiB: four times the largest header set nginx can be configured to pass with
/// `large_client_header_buffers 4 32k`, plus room for the CGI variables; PHP-FPM has no limit.
pub const DEFAULT_MAX_PARAMS_BYTES: usize = 256 * 1024;

/// 1024 pairs: Apache caps a request at 100 header fields, nginx's buffers at a few hundred;
/// the CGI variables add about 30.
pub const DEFAULT_MAX_PARAMS: usize = 1024;

/// 16 requests: nginx and Apache never multiplex, so this only bounds what a hostile or
/// unusual client can make one connection hold.
pub const DEFAULT_MAX_REQUESTS_PER_CONN: usize = 16;

/// 256 KiB: enough for four full-size STDIN records in flight per request, small enough that a
/// few hundred connections stay within a few tens of MiB.
pub const DEFAULT_MAX_BUFFERED_BODY: usize = 256 * 1024;

/// 1024 connections: one file descriptor each under the common default `ulimit -n` of 1024.
pub const DEFAULT_MAX_CONNS: usize = 1024;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_params_bytes: DEFAULT_MAX_PARAMS_BYTES,
            max_params: DEFAULT_MAX_PARAMS,
            max_requests_per_conn: DEFAULT_MAX_REQUESTS_PER_CONN,
            max_buffered_body: DEFAULT_MAX_BUFFERED_BODY,
            max_conns: DEFAULT_MAX_CONNS,
            max_reqs: 1,
        }
    }
}
