//! The thin tokio shell: read events off a socket, and an async client.
//!
//! The loop is the classic one: try to decode; if nothing, read more; zero bytes with an empty
//! buffer is a clean end, zero bytes with leftovers is a truncated record.

use std::fmt;
use std::path::Path;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs, UnixStream};

use crate::client::{self, ClientEvent, Response};
use crate::params::Params;
use crate::record::Role;
use crate::server::{Event, ServerConnection};
use crate::Error;

/// A failure of the socket or of the peer.
#[derive(Debug)]
pub enum IoError {
    /// The socket failed.
    Io(std::io::Error),
    /// The peer broke the protocol.
    Protocol(Error),
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoError::Io(e) => write!(f, "socket error: {e}"),
            IoError::Protocol(e) => write!(f, "protocol error: {e}"),
        }
    }
}

impl std::error::Error for IoError {}

impl From<std::io::Error> for IoError {
    fn from(e: std::io::Error) -> Self {
        IoError::Io(e)
    }
}

impl From<Error> for IoError {
    fn from(e: Error) -> Self {
        IoError::Protocol(e)
    }
}

/// What the connection produced next.
#[derive(Debug)]
pub enum Input {
    /// A request event.
    Event(Event),
    /// Control records the protocol queued (GET_VALUES answers, rejections): write them.
    Output(bytes::Bytes),
    /// The peer closed the connection cleanly, between records.
    Closed,
}

/// Reads until `conn` yields an event or output, or the peer closes.
pub async fn next_input<R: AsyncRead + Unpin>(
    reader: &mut R,
    conn: &mut ServerConnection,
    buf: &mut BytesMut,
) -> Result<Input, IoError> {
    loop {
        if let Some(event) = conn.decode(buf)? {
            return Ok(Input::Event(event));
        }
        if let Some(out) = conn.take_output() {
            return Ok(Input::Output(out));
        }
        buf.reserve(READ_CHUNK);
        if reader.read_buf(buf).await? == 0 {
            conn.handle_eof(buf)?;
            return Ok(Input::Closed);
        }
    }
}

/// Bytes reserved per read: two full-size records, so a large body arrives in few reads.
const READ_CHUNK: usize = 128 * 1024;

/// An async FastCGI client over any stream: one request at a time, connection kept open.
#[derive(Debug)]
pub struct Client<S> {
    stream: S,
    buf: BytesMut,
    next_id: u16,
}

impl Client<TcpStream> {
    /// Connects over TCP.
    pub async fn connect_tcp(addr: impl ToSocketAddrs) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Client::new(stream))
    }
}

impl Client<UnixStream> {
    /// Connects to a unix socket.
    pub async fn connect_unix(path: impl AsRef<Path>) -> std::io::Result<Self> {
        Ok(Client::new(UnixStream::connect(path).await?))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// A client over an established stream.
    pub fn new(stream: S) -> Self {
        Client {
            stream,
            buf: BytesMut::new(),
            next_id: 1,
        }
    }

    /// Sends a Responder request with `FCGI_KEEP_CONN` and reads the whole response.
    pub async fn request(&mut self, params: &Params, stdin: &[u8]) -> Result<Response, IoError> {
        self.request_with(Role::Responder, true, params, stdin, None)
            .await
    }

    /// Sends any request (a Filter's DATA stream in `data`) and reads the whole response.
    pub async fn request_with(
        &mut self,
        role: Role,
        keep_conn: bool,
        params: &Params,
        stdin: &[u8],
        data: Option<&[u8]>,
    ) -> Result<Response, IoError> {
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        let mut out = BytesMut::new();
        client::encode_request(id, role, keep_conn, params, stdin, &mut out);
        if let Some(data) = data {
            client::encode_stream_with_end(crate::record::kind::DATA, id, data, &mut out);
        }
        // Write and read at once, as web servers do: an application may answer before it has
        // read the whole body, and waiting for our write to finish first could deadlock.
        let (mut rd, mut wr) = tokio::io::split(&mut self.stream);
        let buf = &mut self.buf;
        let send = async {
            wr.write_all(&out).await?;
            Ok::<(), IoError>(())
        };
        let receive = async {
            let mut response = Response::default();
            loop {
                if client::read_response(buf, id, &mut response)? {
                    return Ok::<Response, IoError>(response);
                }
                buf.reserve(READ_CHUNK);
                if rd.read_buf(buf).await? == 0 {
                    return Err(IoError::Protocol(Error::IncompleteResponse));
                }
            }
        };
        let ((), response) = tokio::try_join!(send, receive)?;
        Ok(response)
    }

    /// Asks the application for the values of `names` (GET_VALUES).
    pub async fn get_values(&mut self, names: &[&str]) -> Result<Params, IoError> {
        let mut out = BytesMut::new();
        client::encode_get_values(names, &mut out);
        self.stream.write_all(&out).await?;
        loop {
            while let Some(event) = client::decode_event(&mut self.buf)? {
                if let ClientEvent::Values(values) = event {
                    return Ok(values);
                }
            }
            self.fill().await?;
        }
    }

    /// Writes raw bytes (for tests that speak the protocol badly on purpose).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Reads the next event of any kind; `Ok(None)` when the application closed the connection.
    pub async fn next_event(&mut self) -> Result<Option<ClientEvent>, IoError> {
        loop {
            if let Some(event) = client::decode_event(&mut self.buf)? {
                return Ok(Some(event));
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }

    async fn fill(&mut self) -> Result<(), IoError> {
        self.buf.reserve(READ_CHUNK);
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(IoError::Protocol(Error::IncompleteResponse));
        }
        Ok(())
    }

    /// The underlying stream.
    pub fn into_inner(self) -> S {
        self.stream
    }
}
