//! [`TlsStream`]: a TCP connection speaking TLS, driven over the worker's pool buffers.
//!
//! rustls's unbuffered API does no I/O and owns no ciphertext buffer: Ringway reads ciphertext
//! into a pool buffer (`incoming`), rustls decrypts the records there, and the plaintext is
//! copied into the caller's buffer. Writes encrypt into a pool buffer (`outgoing`) taken for the
//! duration of the write. Every buffer is returned as soon as it is empty, so a connection with
//! nothing in flight holds none: an idle keep-alive TLS connection costs its rustls state only.
//!
//! Three buffers at most, each bounded:
//! - `incoming`: ciphertext not yet processed (a partial record, or records read ahead);
//!   grows past one slot only for a record or handshake message larger than a slot.
//! - `pending`: plaintext decrypted but not yet delivered (the caller's room was smaller than
//!   a record, or records arrived while writing).
//! - `outgoing`: encrypted bytes not yet written.
//!
//! Cancellation: every operation marks the stream busy while it runs. A future dropped
//! mid-operation (a timeout) leaves it busy, and a buffer may have gone with the cancelled
//! kernel operation; the next call then fails with [`TlsError::Poisoned`] instead of guessing.
//! A failed operation poisons it too. The caller closes a poisoned connection.

use std::ops::{Deref, DerefMut};
use std::rc::Rc;
use std::time::Duration;

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::UnbufferedConnectionCommon;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError,
    UnbufferedStatus, WriteTraffic,
};
use rustls::{HandshakeKind, ProtocolVersion};

use super::{certs, hello, TlsError};
use crate::buf::{BufPool, PoolBuf};

/// Largest `incoming`: a handshake message may reach 64 KiB (a long certificate chain), plus
/// a record around it.
pub(crate) const MAX_INCOMING: usize = 128 * 1024;

/// Largest `incoming` before a server handshake completes, without client certificates: a
/// ClientHello (even with post-quantum key shares) and the client's Finished fit easily.
pub(crate) const PRE_AUTH_INCOMING: usize = 32 * 1024;

/// Longest wait for a pool slot inside a TLS operation (see [`slot`]).
const SLOT_WAIT: Duration = Duration::from_millis(250);

/// Largest plaintext per record rustls produces (2^14).
const MAX_FRAGMENT: usize = 16 * 1024;

/// Room left for a record's header, nonce, tag and content type (TLS 1.2 GCM needs 29).
const RECORD_OVERHEAD: usize = 64;

/// How long a record waits for a pool buffer larger than one slot. The caller's own deadline
/// normally ends the operation first; this only keeps the wait finite without one.
const BIG_BUFFER_WAIT: Duration = Duration::from_secs(60);

/// A TLS connection, server or client side, over a monoio `TcpStream`.
pub struct TlsStream {
    /// rustls's state machine for this side.
    conn: Conn,
    /// The socket and the pool buffers in use.
    io: Io,
    /// An operation is running, or was dropped before it finished.
    busy: bool,
    /// An operation failed or was cancelled: the connection must be closed.
    poisoned: bool,
    /// `handshake` completed.
    ready: bool,
    /// SNI the client sent (server side), read from its ClientHello.
    sni: Option<Rc<str>>,
    /// Subject of the client's verified certificate (server side, mTLS).
    client_subject: Option<Rc<str>>,
}

enum Conn {
    Server(UnbufferedServerConnection),
    Client(UnbufferedClientConnection),
}

struct Io {
    tcp: TcpStream,
    pool: BufPool,
    incoming: Option<PoolBuf>,
    pending: Option<PoolBuf>,
    outgoing: Option<PoolBuf>,
    /// The peer sent close_notify or closed its side of TCP: reads return 0 from now on.
    peer_closed: bool,
    /// This side queued close_notify: nothing more may be written.
    sent_close: bool,
    /// Largest `incoming` now: smaller before a server handshake completes, so an
    /// unauthenticated client cannot make a connection hold many pool slots.
    limit: usize,
}

/// The two rustls connection types behind one driver.
trait Role: DerefMut<Target = UnbufferedConnectionCommon<Self::Data>> {
    type Data;
    fn process<'c, 'i>(&'c mut self, buf: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl Role for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(&'c mut self, buf: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(buf)
    }
}

impl Role for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(&'c mut self, buf: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(buf)
    }
}

/// What one pass over rustls's state came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// rustls needs more bytes from the peer.
    NeedData,
    /// Handshake bytes were produced and sent, or a record was decrypted; ask again.
    Progress,
    /// Application data may be written and nothing else is due.
    Writable,
    /// The job given for the writable state was done (data encrypted or close_notify queued).
    Wrote,
    /// The peer sent close_notify.
    PeerClosed,
    /// Both sides sent close_notify.
    Closed,
}

/// What to do if rustls reaches the writable state.
enum Job<'a> {
    /// Nothing: report [`Event::Writable`].
    Idle,
    /// Encrypt `data[*done..]`, advancing `done`.
    Encrypt { data: &'a [u8], done: &'a mut usize },
    /// Queue close_notify.
    CloseNotify,
}

/// Where decrypted bytes go: the caller's buffer first, up to `room` bytes, then `pending`.
///
/// The caller's buffer is an owned IO buffer's writable region, held as a raw pointer so any
/// `IoBufMut` (a pool buffer or a slice of one) can be read into, as a socket read would.
struct Sink<'a> {
    dst: *mut u8,
    room: usize,
    got: usize,
    _buf: std::marker::PhantomData<&'a mut [u8]>,
}

impl Sink<'_> {
    fn none() -> Sink<'static> {
        Sink {
            dst: std::ptr::null_mut(),
            room: 0,
            got: 0,
            _buf: std::marker::PhantomData,
        }
    }

    /// Copies as much of `data` as fits; returns the count.
    fn put(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.room - self.got);
        if n > 0 {
            // SAFETY: `dst` points at `room` writable bytes (see `read_buf`), `got + n <= room`,
            // and decrypted data never overlaps the caller's buffer.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.dst.add(self.got), n) };
            self.got += n;
        }
        n
    }
}

impl TlsStream {
    /// A server-side stream over an accepted socket; call [`TlsStream::handshake`] next.
    /// `pre_auth_limit` bounds the handshake bytes held before it completes.
    pub(crate) fn server(
        tcp: TcpStream,
        conn: UnbufferedServerConnection,
        pool: &BufPool,
        pre_auth_limit: usize,
    ) -> Self {
        let mut s = Self::new(tcp, Conn::Server(conn), pool);
        s.io.limit = pre_auth_limit.min(MAX_INCOMING);
        s
    }

    /// A client-side stream over a connected socket; call [`TlsStream::handshake`] next.
    pub(crate) fn client(tcp: TcpStream, conn: UnbufferedClientConnection, pool: &BufPool) -> Self {
        Self::new(tcp, Conn::Client(conn), pool)
    }

    fn new(tcp: TcpStream, conn: Conn, pool: &BufPool) -> Self {
        TlsStream {
            conn,
            io: Io {
                tcp,
                pool: pool.clone(),
                incoming: None,
                pending: None,
                outgoing: None,
                peer_closed: false,
                sent_close: false,
                limit: MAX_INCOMING,
            },
            busy: false,
            poisoned: false,
            ready: false,
            sni: None,
            client_subject: None,
        }
    }

    /// Runs the handshake to completion. Bounded by nothing here: wrap it in a deadline.
    pub async fn handshake(&mut self) -> Result<(), TlsError> {
        self.enter()?;
        let res = match &mut self.conn {
            Conn::Server(c) => handshake_on(c, &mut self.io, Some(&mut self.sni)).await,
            Conn::Client(c) => handshake_on(c, &mut self.io, None).await,
        };
        if res.is_ok() {
            self.ready = true;
            self.io.limit = MAX_INCOMING;
            if let Conn::Server(c) = &self.conn {
                self.client_subject = c
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|leaf| certs::subject_of(leaf.as_ref()))
                    .map(Rc::from);
            }
        }
        self.leave(res)
    }

    /// Reads plaintext into `dst`'s free room, at most `max` bytes; returns the count, 0 once
    /// the peer has closed (close_notify, or TCP closed without it) or when `dst` has no room.
    pub async fn read(&mut self, dst: &mut PoolBuf, max: usize) -> Result<usize, TlsError> {
        let len = dst.len();
        let room = max.min(dst.spare());
        // SAFETY: `len + room` is within the buffer's capacity.
        let at = unsafe { dst.write_ptr().add(len) };
        let n = self.read_into(at, room).await?;
        // SAFETY: `read_into` wrote `n` bytes right after the first `len`.
        unsafe { dst.set_init(len + n) };
        Ok(n)
    }

    /// Reads plaintext into an owned IO buffer's writable region, as a socket read does:
    /// returns the count (0 once the peer has closed) and the buffer.
    pub async fn read_buf<T: IoBufMut>(&mut self, mut buf: T) -> (Result<usize, TlsError>, T) {
        let res = self.read_into(buf.write_ptr(), buf.bytes_total()).await;
        if let Ok(n) = res {
            // SAFETY: `read_into` wrote exactly `n` bytes from the start of the region.
            unsafe { buf.set_init(n) };
        }
        (res, buf)
    }

    /// Reads plaintext into the `room` writable bytes at `dst`.
    async fn read_into(&mut self, dst: *mut u8, room: usize) -> Result<usize, TlsError> {
        self.enter()?;
        if !self.ready {
            return self.leave(Err(TlsError::NotReady));
        }
        let mut sink = Sink {
            dst,
            room,
            got: 0,
            _buf: std::marker::PhantomData,
        };
        let res = match &mut self.conn {
            Conn::Server(c) => read_on(c, &mut self.io, &mut sink).await,
            Conn::Client(c) => read_on(c, &mut self.io, &mut sink).await,
        };
        self.leave(res)
    }

    /// Encrypts and sends `buf[range]` whole. Output goes through one pool buffer taken for
    /// the duration of the call.
    pub async fn write_all(
        &mut self,
        buf: &PoolBuf,
        range: std::ops::Range<usize>,
    ) -> Result<(), TlsError> {
        match buf.get(range) {
            Some(data) => self.write_slice(data).await,
            None => {
                self.poisoned = true;
                Err(TlsError::Config("write range outside the buffer".into()))
            }
        }
    }

    /// Encrypts and sends `data` whole (for bytes that do not live in a pool buffer).
    pub async fn write_slice(&mut self, data: &[u8]) -> Result<(), TlsError> {
        self.enter()?;
        if !self.ready {
            return self.leave(Err(TlsError::NotReady));
        }
        let res = match &mut self.conn {
            Conn::Server(c) => write_on(c, &mut self.io, data).await,
            Conn::Client(c) => write_on(c, &mut self.io, data).await,
        };
        self.leave(res)
    }

    /// Waits until a read would make progress: at once when plaintext or ciphertext is already
    /// buffered or the peer has closed, else until the socket is readable. Holds no buffer
    /// while it waits, and dropping it (an idle timeout) is harmless.
    pub async fn readable(&mut self) -> Result<(), TlsError> {
        if self.poisoned || self.busy {
            self.poisoned = true;
            return Err(TlsError::Poisoned);
        }
        if self.has_buffered() {
            return Ok(());
        }
        self.io.tcp.readable(false).await.map_err(TlsError::Io)
    }

    /// Sends close_notify (once) and shuts the TCP write side.
    pub async fn shutdown(&mut self) -> Result<(), TlsError> {
        self.enter()?;
        let res = if self.ready {
            match &mut self.conn {
                Conn::Server(c) => close_on(c, &mut self.io).await,
                Conn::Client(c) => close_on(c, &mut self.io).await,
            }
        } else {
            Ok(())
        };
        let res = match res {
            Ok(()) => match self.io.tcp.shutdown().await {
                // The peer is already gone: nothing left to shut.
                Err(e) if e.kind() == std::io::ErrorKind::NotConnected => Ok(()),
                other => other.map_err(TlsError::Io),
            },
            Err(e) => Err(e),
        };
        self.leave(res)
    }

    /// True when bytes are buffered that a read will deliver or process without waiting for
    /// the socket, or when the peer has closed (a read returns 0 at once).
    pub fn has_buffered(&self) -> bool {
        let filled = |b: &Option<PoolBuf>| b.as_ref().is_some_and(|b| !b.is_empty());
        filled(&self.io.pending) || filled(&self.io.incoming) || self.io.peer_closed
    }

    /// Pool buffers this stream holds now (0 when idle).
    pub fn buffers_held(&self) -> usize {
        [&self.io.incoming, &self.io.pending, &self.io.outgoing]
            .iter()
            .filter(|b| b.is_some())
            .count()
    }

    /// Whether an earlier operation failed or was cancelled; the connection must be closed.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned || self.busy
    }

    /// The underlying socket (addresses, socket options). Reading or writing it directly
    /// would corrupt the TLS stream.
    pub fn tcp(&self) -> &TcpStream {
        &self.io.tcp
    }

    /// "TLSv1.3" or "TLSv1.2" once the handshake has chosen.
    pub fn protocol_version(&self) -> Option<&'static str> {
        match self.common().protocol_version()? {
            ProtocolVersion::TLSv1_3 => Some("TLSv1.3"),
            ProtocolVersion::TLSv1_2 => Some("TLSv1.2"),
            _ => None,
        }
    }

    /// The negotiated ALPN protocol ("http/1.1"), if any.
    pub fn alpn(&self) -> Option<&[u8]> {
        self.common().alpn_protocol()
    }

    /// The SNI name the client sent, lowercased (server side).
    pub fn sni(&self) -> Option<&str> {
        self.sni.as_deref()
    }

    /// The SNI name, shared (for the access log, without a copy per request).
    pub fn sni_shared(&self) -> Option<Rc<str>> {
        self.sni.clone()
    }

    /// The client certificate's subject, shared (access log, limit keys).
    pub fn client_subject_shared(&self) -> Option<Rc<str>> {
        self.client_subject.clone()
    }

    /// The subject ("CN=…, O=…") of the client certificate verified in the handshake (server
    /// side, `client_auth`); a limit key and an access-log field.
    pub fn client_subject(&self) -> Option<&str> {
        self.client_subject.as_deref()
    }

    /// Whether the handshake resumed an earlier session (ticket or session id).
    pub fn resumed(&self) -> bool {
        self.common().handshake_kind() == Some(HandshakeKind::Resumed)
    }

    fn common(&self) -> &rustls::CommonState {
        match &self.conn {
            Conn::Server(c) => c.deref().deref(),
            Conn::Client(c) => c.deref().deref(),
        }
    }

    /// Starts an operation; refuses when the stream is unusable.
    fn enter(&mut self) -> Result<(), TlsError> {
        if self.busy || self.poisoned {
            self.poisoned = true;
            return Err(TlsError::Poisoned);
        }
        self.busy = true;
        Ok(())
    }

    /// Ends an operation: returns empty buffers to the pool, poisons on failure.
    fn leave<T>(&mut self, res: Result<T, TlsError>) -> Result<T, TlsError> {
        self.busy = false;
        if res.is_err() {
            self.poisoned = true;
            // A failed connection keeps nothing: it is about to be closed.
            self.io.incoming = None;
            self.io.pending = None;
            self.io.outgoing = None;
        } else {
            release_if_empty(&mut self.io.incoming);
            release_if_empty(&mut self.io.pending);
            release_if_empty(&mut self.io.outgoing);
        }
        res
    }
}

fn release_if_empty(b: &mut Option<PoolBuf>) {
    if b.as_ref().is_some_and(|b| b.is_empty()) {
        *b = None;
    }
}

/// One pool slot, waiting at most [`SLOT_WAIT`]. A TLS stream needs a slot of its own
/// (ciphertext in or out) while its caller holds another: unbounded waits could leave every
/// connection holding one slot and waiting for a second. Past the wait the operation fails
/// and the connection closes, instead of all of them stalling until their deadlines.
async fn slot(pool: &BufPool) -> Result<PoolBuf, TlsError> {
    pool.acquire_within(pool.slot_size(), SLOT_WAIT)
        .await
        .map_err(TlsError::Buffers)
}

/// Takes a buffer of at least `bytes` bytes, waiting for the pool if needed.
async fn take(pool: &BufPool, bytes: usize) -> Result<PoolBuf, TlsError> {
    if bytes <= pool.slot_size() {
        slot(pool).await
    } else {
        pool.acquire_within(bytes, BIG_BUFFER_WAIT)
            .await
            .map_err(TlsError::Buffers)
    }
}

/// Writes all of `outgoing` to the socket and empties it.
async fn flush(tcp: &mut TcpStream, outgoing: &mut Option<PoolBuf>) -> Result<(), TlsError> {
    let Some(buf) = outgoing.take() else {
        return Ok(());
    };
    if buf.is_empty() {
        *outgoing = Some(buf);
        return Ok(());
    }
    let len = buf.len();
    let (res, slice) = tcp.write_all(monoio::buf::IoBuf::slice(buf, 0..len)).await;
    res?;
    let mut buf = slice.into_inner();
    buf.clear();
    *outgoing = Some(buf);
    Ok(())
}

/// Reads more ciphertext into `incoming`; false at EOF.
async fn read_more(io: &mut Io) -> Result<bool, TlsError> {
    let mut buf = match io.incoming.take() {
        Some(b) => b,
        None => slot(&io.pool).await?,
    };
    if buf.spare() == 0 {
        // A record or handshake message larger than the buffer: move it to a larger one.
        let cap = buf.capacity();
        if cap >= io.limit {
            return Err(TlsError::TooLarge(cap));
        }
        let mut bigger = take(&io.pool, (cap * 2).min(io.limit)).await?;
        // Cannot fail: the new buffer is larger than everything in the old one.
        let _ = bigger.put(&buf);
        buf = bigger;
    }
    let (len, cap) = (buf.len(), buf.capacity());
    let (res, slice) = io
        .tcp
        .read(monoio::buf::IoBufMut::slice_mut(buf, len..cap))
        .await;
    io.incoming = Some(slice.into_inner());
    Ok(res? > 0)
}

/// Copies decrypted bytes to the caller's buffer, and what does not fit to `pending`.
async fn deliver(
    payload: &[u8],
    sink: &mut Sink<'_>,
    pool: &BufPool,
    pending: &mut Option<PoolBuf>,
) -> Result<(), TlsError> {
    let mut rest = payload;
    let nothing_pending = pending.as_ref().is_none_or(|p| p.is_empty());
    if nothing_pending && !sink.dst.is_null() {
        let n = sink.put(rest);
        rest = &rest[n..];
    }
    if rest.is_empty() {
        return Ok(());
    }
    match pending {
        Some(p) if p.spare() >= rest.len() => {
            let _ = p.put(rest);
        }
        _ => {
            let have = pending.as_ref().map_or(0, |p| p.len());
            let need = have + rest.len();
            if need > MAX_INCOMING {
                return Err(TlsError::TooLarge(need));
            }
            let mut bigger = take(pool, need).await?;
            if let Some(old) = pending.take() {
                let _ = bigger.put(&old);
            }
            let _ = bigger.put(rest);
            *pending = Some(bigger);
        }
    }
    Ok(())
}

/// Puts one handshake record into `outgoing`, flushing or growing it when it does not fit.
async fn encode<D>(
    st: &mut EncodeTlsData<'_, D>,
    tcp: &mut TcpStream,
    pool: &BufPool,
    outgoing: &mut Option<PoolBuf>,
) -> Result<(), TlsError> {
    loop {
        if outgoing.is_none() {
            *outgoing = Some(slot(pool).await?);
        }
        let Some(out) = outgoing.as_mut() else {
            continue;
        };
        match out.fill_with(|room| st.encode(room).map(|n| (n, ()))) {
            Ok(()) => return Ok(()),
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                if !out.is_empty() {
                    flush(tcp, outgoing).await?;
                } else if required_size > MAX_INCOMING {
                    return Err(TlsError::TooLarge(required_size));
                } else {
                    *outgoing = Some(take(pool, required_size).await?);
                }
            }
            Err(EncodeError::AlreadyEncoded) => {
                return Err(TlsError::Config("rustls record encoded twice".into()))
            }
        }
    }
}

/// Encrypts `data[*done..]` into `outgoing`, one record at a time, flushing when it is full.
async fn encrypt<D>(
    wt: &mut WriteTraffic<'_, D>,
    data: &[u8],
    done: &mut usize,
    tcp: &mut TcpStream,
    pool: &BufPool,
    outgoing: &mut Option<PoolBuf>,
) -> Result<(), TlsError> {
    while *done < data.len() {
        if outgoing.is_none() {
            *outgoing = Some(slot(pool).await?);
        }
        let Some(out) = outgoing.as_mut() else {
            continue;
        };
        let room = out.spare();
        if room <= RECORD_OVERHEAD {
            flush(tcp, outgoing).await?;
            continue;
        }
        let rest = &data[*done..];
        let chunk = rest.len().min(MAX_FRAGMENT).min(room - RECORD_OVERHEAD);
        match out.fill_with(|r| wt.encrypt(&rest[..chunk], r).map(|n| (n, ()))) {
            Ok(()) => *done += chunk,
            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                if !out.is_empty() {
                    flush(tcp, outgoing).await?;
                } else if required_size > MAX_INCOMING {
                    return Err(TlsError::TooLarge(required_size));
                } else {
                    *outgoing = Some(take(pool, required_size).await?);
                }
            }
            Err(EncryptError::EncryptExhausted) => {
                return Err(TlsError::Protocol(rustls::Error::EncryptError))
            }
        }
    }
    Ok(())
}

/// Processes what `incoming` holds once and acts on the state rustls reaches.
async fn step<C: Role>(
    conn: &mut C,
    io: &mut Io,
    sink: &mut Sink<'_>,
    job: &mut Job<'_>,
) -> Result<Event, TlsError> {
    let Io {
        tcp,
        pool,
        incoming,
        pending,
        outgoing,
        sent_close,
        ..
    } = io;
    let input: &mut [u8] = match incoming.as_mut() {
        Some(b) => b,
        None => &mut [],
    };
    let UnbufferedStatus { discard, state } = conn.process(input);
    let event = match state {
        Err(e) => Err(TlsError::Protocol(e)),
        Ok(ConnectionState::ReadTraffic(mut rt)) => {
            let mut res = Ok(Event::Progress);
            while let Some(rec) = rt.next_record() {
                match rec {
                    Ok(rec) => {
                        if let Err(e) = deliver(rec.payload, sink, pool, pending).await {
                            res = Err(e);
                            break;
                        }
                    }
                    Err(e) => {
                        res = Err(TlsError::Protocol(e));
                        break;
                    }
                }
            }
            res
        }
        Ok(ConnectionState::EncodeTlsData(mut st)) => encode(&mut st, tcp, pool, outgoing)
            .await
            .map(|_| Event::Progress),
        Ok(ConnectionState::TransmitTlsData(st)) => {
            // rustls only needs to know the bytes will go before anything it produces next;
            // they are flushed right below, before rustls is asked again.
            st.done();
            flush(tcp, outgoing).await.map(|_| Event::Progress)
        }
        Ok(ConnectionState::BlockedHandshake) => Ok(Event::NeedData),
        Ok(ConnectionState::WriteTraffic(mut wt)) => match job {
            Job::Idle => Ok(Event::Writable),
            Job::Encrypt { data, done } => encrypt(&mut wt, data, done, tcp, pool, outgoing)
                .await
                .map(|_| Event::Wrote),
            Job::CloseNotify => {
                let res = match outgoing.as_mut() {
                    Some(out) => out.fill_with(|r| wt.queue_close_notify(r).map(|n| (n, ()))),
                    None => {
                        let mut out = slot(pool).await?;
                        let res = out.fill_with(|r| wt.queue_close_notify(r).map(|n| (n, ())));
                        *outgoing = Some(out);
                        res
                    }
                };
                *sent_close = true;
                res.map(|_| Event::Wrote)
                    .map_err(|_| TlsError::Protocol(rustls::Error::EncryptError))
            }
        },
        Ok(ConnectionState::PeerClosed) => Ok(Event::PeerClosed),
        Ok(ConnectionState::Closed) => Ok(Event::Closed),
        // Early data is never enabled, so it cannot arrive; newer states are not expected.
        Ok(_) => Err(TlsError::Protocol(rustls::Error::General(
            "unexpected TLS state".into(),
        ))),
    };
    if discard > 0 {
        if let Some(b) = incoming.as_mut() {
            b.consume(discard);
        }
    }
    event
}

async fn handshake_on<C: Role>(
    conn: &mut C,
    io: &mut Io,
    mut sni: Option<&mut Option<Rc<str>>>,
) -> Result<(), TlsError> {
    // Read the client's SNI before rustls consumes the ClientHello.
    let mut hello_seen = false;
    loop {
        if let (false, Some(slot), Some(inc)) = (hello_seen, sni.as_deref_mut(), &io.incoming) {
            if slot.is_none() {
                *slot = hello::client_hello_sni(inc).map(Rc::from);
            }
        }
        let event = match step(conn, io, &mut Sink::none(), &mut Job::Idle).await {
            Ok(e) => e,
            Err(e) => {
                send_alert(conn, io).await;
                return Err(e);
            }
        };
        if event != Event::NeedData {
            hello_seen = hello_seen || io.incoming.is_some();
        }
        match event {
            Event::Writable | Event::Wrote => break,
            Event::Progress => {}
            Event::NeedData => {
                if !read_more(io).await? {
                    return Err(TlsError::HandshakeEof);
                }
            }
            // A client may send its last flight, a request and close_notify at once.
            Event::PeerClosed | Event::Closed if !conn.is_handshaking() => {
                io.peer_closed = true;
                break;
            }
            Event::PeerClosed | Event::Closed => return Err(TlsError::HandshakeEof),
        }
    }
    flush(&mut io.tcp, &mut io.outgoing).await
}

/// After a handshake error, sends the alert rustls queued (no_application_protocol,
/// protocol_version, bad_certificate …) so that the peer learns why. Best effort.
async fn send_alert<C: Role>(conn: &mut C, io: &mut Io) {
    // rustls must not see the failed input again: deframing it twice would try to send a
    // second fatal alert, which rustls asserts against. While messages are queued (a
    // ServerHello may precede the alert), a pass over an empty input hands out the next one
    // without deframing anything.
    let Io {
        tcp,
        pool,
        outgoing,
        ..
    } = io;
    for _ in 0..8 {
        if !conn.wants_write() {
            break;
        }
        match conn.process(&mut []).state {
            Ok(ConnectionState::EncodeTlsData(mut st)) => {
                if encode(&mut st, tcp, pool, outgoing).await.is_err() {
                    return;
                }
            }
            _ => break,
        }
    }
    let _ = flush(tcp, outgoing).await;
}

async fn read_on<C: Role>(
    conn: &mut C,
    io: &mut Io,
    sink: &mut Sink<'_>,
) -> Result<usize, TlsError> {
    if sink.room == 0 {
        return Ok(0);
    }
    if let Some(p) = io.pending.as_mut().filter(|p| !p.is_empty()) {
        let n = sink.put(p);
        p.consume(n);
        return Ok(n);
    }
    if io.peer_closed {
        return Ok(0);
    }
    loop {
        let event = step(conn, io, sink, &mut Job::Idle).await?;
        if sink.got > 0 {
            return Ok(sink.got);
        }
        match event {
            Event::Progress | Event::Wrote => {}
            Event::PeerClosed | Event::Closed => {
                io.peer_closed = true;
                return Ok(0);
            }
            Event::NeedData | Event::Writable => {
                if !read_more(io).await? {
                    // TCP closed without close_notify. HTTP framing tells a cut-off body from
                    // a complete one, so this reads as the end, as it does on plain TCP.
                    io.peer_closed = true;
                    return Ok(0);
                }
            }
        }
    }
}

async fn write_on<C: Role>(conn: &mut C, io: &mut Io, data: &[u8]) -> Result<(), TlsError> {
    if io.sent_close {
        return Err(TlsError::Closed);
    }
    let mut done = 0;
    while done < data.len() {
        let mut job = Job::Encrypt {
            data,
            done: &mut done,
        };
        match step(conn, io, &mut Sink::none(), &mut job).await? {
            Event::Wrote | Event::Progress | Event::Writable => {}
            // The peer may close its side while this side still answers.
            Event::PeerClosed => io.peer_closed = true,
            Event::Closed => return Err(TlsError::Closed),
            Event::NeedData => {
                if !read_more(io).await? {
                    return Err(TlsError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
            }
        }
    }
    flush(&mut io.tcp, &mut io.outgoing).await
}

async fn close_on<C: Role>(conn: &mut C, io: &mut Io) -> Result<(), TlsError> {
    // A few passes: records read ahead are decrypted (and dropped) before rustls lets this
    // side write; anything else means there is nothing to close.
    for _ in 0..8 {
        if io.sent_close {
            break;
        }
        match step(conn, io, &mut Sink::none(), &mut Job::CloseNotify).await? {
            Event::Wrote | Event::Closed => break,
            Event::PeerClosed => io.peer_closed = true,
            Event::Progress | Event::Writable => {}
            Event::NeedData => break,
        }
    }
    io.sent_close = true;
    io.pending = None;
    flush(&mut io.tcp, &mut io.outgoing).await
}
