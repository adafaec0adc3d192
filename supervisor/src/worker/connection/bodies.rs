//! The request bodies one connection is receiving: a bounded channel to each request's
//! [`BodyReader`], and the one chunk that may wait for room in a full channel. While it waits
//! the connection reads nothing more, so a slow application slows the client instead of
//! growing memory.

use std::future::Future;

use bytes::Bytes;
use fcgi::server::Event;
use fcgi::Role;
use tokio::sync::mpsc;

use crate::app::body::BodyReader;

/// The error of a body channel whose reader is gone.
pub(crate) type Closed = mpsc::error::SendError<()>;

/// One connection's request bodies.
pub(super) struct Bodies {
    /// Record-sized chunks one request buffers before the socket stops being read.
    chunks: usize,
    streams: Vec<Streams>,
    pending: Option<Pending>,
}

/// A request's body streams still open.
struct Streams {
    id: u16,
    stdin: Option<mpsc::Sender<Bytes>>,
    data: Option<mpsc::Sender<Bytes>>,
}

/// A body chunk waiting for room in its request's channel.
struct Pending {
    tx: mpsc::Sender<Bytes>,
    chunk: Bytes,
}

impl Bodies {
    pub(super) fn new(limits: &fcgi::Limits) -> Bodies {
        Bodies {
            chunks: (limits.max_buffered_body / fcgi::record::MAX_CONTENT_LEN).max(1),
            streams: Vec::new(),
            pending: None,
        }
    }

    /// Opens the body streams of request `id`: its STDIN, and DATA for the Filter role.
    pub(super) fn open(&mut self, id: u16, role: Role) -> (BodyReader, BodyReader) {
        let (stdin_tx, stdin_rx) = mpsc::channel(self.chunks);
        let (data, data_tx) = if role == Role::Filter {
            let (tx, rx) = mpsc::channel(self.chunks);
            (BodyReader::new(rx), Some(tx))
        } else {
            (BodyReader::empty(), None)
        };
        self.streams.push(Streams {
            id,
            stdin: Some(stdin_tx),
            data: data_tx,
        });
        (BodyReader::new(stdin_rx), data)
    }

    /// A chunk waits for room: nothing more is read until it has some.
    pub(super) fn waiting(&self) -> bool {
        self.pending.is_some()
    }

    /// Acts on a body event (a request event is not one and changes nothing).
    pub(super) fn on_event(&mut self, event: Event) {
        self.pending = match event {
            Event::Request(_) | Event::Rejected { .. } => None,
            Event::Stdin { id, data } => self.feed(id, data, |s| &mut s.stdin),
            Event::Data { id, data } => self.feed(id, data, |s| &mut s.data),
            Event::StdinEnd { id } => {
                self.close(id, |s| &mut s.stdin);
                None
            }
            Event::DataEnd { id } => {
                self.close(id, |s| &mut s.data);
                None
            }
            Event::Abort { id } => {
                // The handler sees its body end early; whatever it answers goes to a client
                // that no longer waits, and END_REQUEST closes the request.
                self.close(id, |s| &mut s.stdin);
                self.close(id, |s| &mut s.data);
                None
            }
        };
    }

    /// Waits for room for the waiting chunk. Owns what it waits on, so the connection's state
    /// stays free for the handler of whichever branch of its loop wins.
    pub(super) fn wait_for_room(
        &self,
    ) -> impl Future<Output = Result<mpsc::OwnedPermit<Bytes>, Closed>> + 'static {
        let tx = self.pending.as_ref().map(|p| p.tx.clone());
        async move {
            match tx {
                Some(tx) => tx.reserve_owned().await,
                None => std::future::pending().await,
            }
        }
    }

    /// Room came: the waiting chunk goes. A closed channel means the handler stopped reading:
    /// the chunk is dropped, and the rest of that body drained.
    pub(super) fn on_room(&mut self, room: Result<mpsc::OwnedPermit<Bytes>, Closed>) {
        if let (Ok(permit), Some(pending)) = (room, self.pending.take()) {
            permit.send(pending.chunk);
        }
        self.pending = None;
    }

    /// Request `id` was answered: its bodies are of no more use.
    pub(super) fn end(&mut self, id: u16) {
        self.streams.retain(|s| s.id != id);
    }

    /// The input ended: bodies still open will never complete, their readers see the end.
    pub(super) fn end_all(&mut self) {
        self.streams.clear();
    }

    /// Feeds a body chunk to its request; returns it if it must wait for room.
    fn feed(
        &mut self,
        id: u16,
        data: Bytes,
        which: impl Fn(&mut Streams) -> &mut Option<mpsc::Sender<Bytes>>,
    ) -> Option<Pending> {
        let s = self.streams.iter_mut().find(|s| s.id == id)?;
        let tx = which(s).as_ref()?;
        match tx.try_send(data) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(chunk)) => Some(Pending {
                tx: tx.clone(),
                chunk,
            }),
            // The handler is done with the body: what is left is drained, not an error.
            Err(mpsc::error::TrySendError::Closed(_)) => None,
        }
    }

    /// Ends one body stream of a request: its reader sees the end.
    fn close(&mut self, id: u16, which: impl Fn(&mut Streams) -> &mut Option<mpsc::Sender<Bytes>>) {
        if let Some(s) = self.streams.iter_mut().find(|s| s.id == id) {
            *which(s) = None;
        }
    }
}
