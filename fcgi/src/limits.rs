//! Bounds on everything a peer controls. Every length from the wire is checked against one of
//! these before anything is allocated.

/// The bounds one connection enforces. `Default` gives values suited to nginx and Apache in front.
///
/// What a peer meets at each bound:
/// - `max_params_bytes`, `max_params`: the request is rejected on its own
///   ([`crate::server::Event::Rejected`]); the connection stays usable.
/// - `max_requests_per_conn`: a BEGIN_REQUEST beyond it is refused by the core with
///   END_REQUEST (`FCGI_CANT_MPX_CONN` when it is 1, `FCGI_OVERLOADED` above); the requests
///   already open and the connection carry on.
/// - `max_buffered_body`, `max_conns`, `max_reqs`: enforced by the shell that runs requests (it
///   owns the sockets and the body channels); the core only reports them to GET_VALUES.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Total bytes of one request's PARAMS stream.
    pub max_params_bytes: usize,
    /// Name-value pairs in one request's PARAMS stream.
    pub max_params: usize,
    /// Requests running at once on one connection. 1 (the default) means no multiplexing:
    /// GET_VALUES answers `FCGI_MPXS_CONNS` 0 and a second concurrent request is refused with
    /// `FCGI_CANT_MPX_CONN`. Above 1 the connection multiplexes up to this many (see
    /// [`MULTIPLEXED_REQUESTS_PER_CONN`]); the shell must then keep one request's unread body
    /// from blocking the others' records.
    pub max_requests_per_conn: usize,
    /// Request body bytes a connection buffers before it stops reading the socket.
    pub max_buffered_body: usize,
    /// Connections one server process accepts at once, answered to `FCGI_MAX_CONNS`. The core
    /// sees one connection and cannot count them: the worker enforces it.
    pub max_conns: usize,
    /// Requests one server process runs at once, answered (capped by what `max_conns` and
    /// `max_requests_per_conn` allow) to `FCGI_MAX_REQS`. The worker enforces it.
    pub max_reqs: usize,
}

/// 256 KiB: four times the largest header set nginx can be configured to pass with
/// `large_client_header_buffers 4 32k`, plus room for the CGI variables; PHP-FPM has no limit.
pub const DEFAULT_MAX_PARAMS_BYTES: usize = 256 * 1024;

/// 1024 pairs: Apache caps a request at 100 header fields, nginx's buffers at a few hundred;
/// the CGI variables add about 30.
pub const DEFAULT_MAX_PARAMS: usize = 1024;

/// 1 request: nginx and Apache never multiplex, and a worker that runs one connection's
/// requests behind one socket can stall when a request waiting for room holds up the body of
/// the one running. Saying `FCGI_MPXS_CONNS` 0 and refusing the second request keeps that
/// from happening with any client.
pub const DEFAULT_MAX_REQUESTS_PER_CONN: usize = 1;

/// 16 requests: a value for `max_requests_per_conn` when multiplexing is wanted. Clients that
/// multiplex (a few FastCGI client libraries) open a handful at a time; this only bounds what a
/// hostile or unusual client can make one connection hold.
pub const MULTIPLEXED_REQUESTS_PER_CONN: usize = 16;

/// 256 KiB: enough for four full-size STDIN records in flight per request, small enough that a
/// few hundred connections stay within a few tens of MiB.
pub const DEFAULT_MAX_BUFFERED_BODY: usize = 256 * 1024;

/// 1024 connections: one file descriptor each under the common default `ulimit -n` of 1024.
pub const DEFAULT_MAX_CONNS: usize = 1024;

/// 1 request: a process that runs requests one at a time, until the shell says otherwise (the
/// worker sets its `max_requests_in_flight`).
pub const DEFAULT_MAX_REQS: usize = 1;

impl Limits {
    /// Whether a connection runs more than one request at once (`FCGI_MPXS_CONNS`).
    pub fn multiplexes(&self) -> bool {
        self.max_requests_per_conn > 1
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_params_bytes: DEFAULT_MAX_PARAMS_BYTES,
            max_params: DEFAULT_MAX_PARAMS,
            max_requests_per_conn: DEFAULT_MAX_REQUESTS_PER_CONN,
            max_buffered_body: DEFAULT_MAX_BUFFERED_BODY,
            max_conns: DEFAULT_MAX_CONNS,
            max_reqs: DEFAULT_MAX_REQS,
        }
    }
}
