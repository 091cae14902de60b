//! The serving layer every listener shares: the mesh's, the edge's HTTPS
//! and HTTP, the admin endpoint, and the CA's API and HTTP listeners.
//!
//! A [`Gate`] accepts within a connection cap (logging when the cap is
//! reached), tracks every connection's task, and drains them when the
//! listener stops. A [`Session`] runs one connection's TLS handshake within
//! the handshake timeout and its HTTP with header-read and idle timeouts.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Incoming};
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::config::Limits;
use crate::metrics::{ListenerMetrics, Rejection};
use crate::reload::{CertStore, Prebuild, Snapshot};
use crate::tls::{self, ClientAuth};

/// Accept queue asked of the kernel (capped by `net.core.somaxconn`). A
/// burst beyond tokio's default of 1024 is queued rather than dropped: a
/// dropped handshake that a SYN cookie completed leaves the client
/// believing it is connected to a server that never saw it.
const BACKLOG: u32 = 4096;

/// Binds a listening socket on `addr` with a deep accept queue.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// The next accepted connection, or `None` once `stop` turns true. Accept
/// errors (such as running out of file descriptors) are logged and retried
/// after a pause.
pub async fn next_connection(
    socket: &TcpListener,
    stop: &mut watch::Receiver<bool>,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => None,
            a = socket.accept() => Some(a),
        };
        match accepted {
            None => return None,
            Some(Ok(a)) => return Some(a),
            Some(Err(e)) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// The host of a `Host` header or URL authority, with an IPv6 address's
/// brackets kept (`[::1]` of `[::1]` or `[::1]:8443`, `web` of `web:80`);
/// `None` when it is not one: user info, a port that is not a number, or a
/// host that is neither a DNS name, an IPv4 address nor a bracketed IPv6 one.
pub fn authority_host(authority: &str) -> Option<String> {
    if authority.contains('@') {
        return None;
    }
    let parsed = authority.parse::<http::uri::Authority>().ok()?;
    let host = parsed.host();
    // The parser takes any text after the last colon; a port is digits.
    if parsed.as_str().len() > host.len() && parsed.port_u16().is_none() {
        return None;
    }
    let valid = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')),
    };
    valid.then(|| host.to_owned())
}

/// How often a full cap is logged while it stays full.
const CAP_LOG_INTERVAL: Duration = Duration::from_secs(10);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Admits connections to one named listener within its cap.
pub struct Gate {
    name: String,
    limits: Limits,
    metrics: Arc<ListenerMetrics>,
    slots: Arc<Semaphore>,
    /// When a full cap was last logged.
    cap_logged: Mutex<Option<Instant>>,
}

impl Gate {
    /// A gate for the listener `name`, counting into `metrics`.
    pub fn new(name: impl Into<String>, limits: Limits, metrics: Arc<ListenerMetrics>) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            metrics,
            cap_logged: Mutex::new(None),
        })
    }

    /// Accepts on `listener` until `stop` turns true, running `handle` on
    /// its own task for each connection the cap admits. Then it asks open
    /// HTTP connections to finish their requests and close, and waits for
    /// every task up to the drain timeout before closing what is left.
    pub async fn serve<H, F>(self: Arc<Self>, listener: TcpListener, mut stop: watch::Receiver<bool>, mut handle: H)
    where
        H: FnMut(TcpStream, Session) -> F,
        F: Future<Output = ()> + Send + 'static,
    {
        let graceful = GracefulShutdown::new();
        let mut tasks = JoinSet::new();
        while let Some((tcp, peer)) = next_connection(&listener, &mut stop).await {
            while tasks.try_join_next().is_some() {}
            let Some(admitted) = self.admit(peer) else { continue };
            let _ = tcp.set_nodelay(true);
            let session = Session { peer, gate: self.clone(), watcher: graceful.watcher(), stop: stop.clone() };
            let work = handle(tcp, session);
            tasks.spawn(async move {
                let _held = admitted;
                work.await;
            });
        }
        drop(listener);
        let drained = tokio::time::timeout(self.limits.drain_timeout.get(), async {
            graceful.shutdown().await;
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(listener = %self.name, open = tasks.len(), "drain timeout: closing open connections");
        }
    }

    /// The limits this gate applies.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A slot for a connection from `peer`, held for as long as it lives;
    /// `None` (counted, and logged at most every 10 s) when the cap is full.
    pub fn admit(&self, peer: SocketAddr) -> Option<Admitted> {
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            self.refuse(peer);
            return None;
        };
        Some(Admitted { _open: Open::new(self.metrics.clone()), _permit: permit })
    }

    /// Waits up to the drain timeout for every admitted connection to end;
    /// for listeners that run their connections on their own tasks.
    pub async fn drain(&self) {
        let all = self.limits.max_connections as u32;
        if tokio::time::timeout(self.limits.drain_timeout.get(), self.slots.acquire_many(all)).await.is_err() {
            tracing::warn!(listener = %self.name, "drain timeout: closing open connections");
        }
    }

    fn refuse(&self, peer: SocketAddr) {
        self.metrics.over_cap.fetch_add(1, Ordering::Relaxed);
        let mut logged = self.cap_logged.lock().unwrap_or_else(|e| e.into_inner());
        if logged.is_none_or(|at| at.elapsed() >= CAP_LOG_INTERVAL) {
            *logged = Some(Instant::now());
            tracing::warn!(
                listener = %self.name,
                cap = self.limits.max_connections,
                %peer,
                "connection cap reached: refusing new connections until open ones close (raise limits.max_connections if this is real load)"
            );
        }
    }

    /// Counts how an HTTP connection ended when it ended by a timeout.
    fn closed(&self, out: Option<Result<(), BoxError>>, peer: SocketAddr) {
        let timed_out = match &out {
            None => true,
            Some(Err(e)) => e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout),
            Some(Ok(())) => false,
        };
        if timed_out {
            self.metrics.timeouts.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(listener = %self.name, %peer, "closed by the header-read or idle timeout");
        }
    }
}

/// A connection's place under its listener's cap: it holds a slot and
/// counts as open until dropped.
pub struct Admitted {
    _open: Open,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Counts a connection as open for as long as it lives.
struct Open(Arc<ListenerMetrics>);

impl Open {
    fn new(metrics: Arc<ListenerMetrics>) -> Self {
        metrics.active.fetch_add(1, Ordering::Relaxed);
        Self(metrics)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One admitted connection's context.
pub struct Session {
    /// The client's address.
    pub peer: SocketAddr,
    gate: Arc<Gate>,
    watcher: Watcher,
    /// Turns true when the listener stops.
    stop: watch::Receiver<bool>,
}

impl Session {
    /// The listener's limits.
    pub fn limits(&self) -> &Limits {
        &self.gate.limits
    }

    /// The listener's counters.
    pub fn metrics(&self) -> &ListenerMetrics {
        &self.gate.metrics
    }

    /// Runs a TLS handshake within the handshake timeout, counting a failure
    /// by reason; `None` when it failed or timed out.
    pub async fn handshake<T>(&self, accept: impl Future<Output = io::Result<T>>) -> Option<T> {
        match tokio::time::timeout(self.limits().handshake_timeout.get(), accept).await {
            Ok(Ok(tls)) => Some(tls),
            Ok(Err(e)) => {
                let why = self.metrics().handshake_failed(&e);
                tracing::debug!(listener = %self.gate.name, peer = %self.peer, reason = why.label(), "handshake failed: {e}");
                None
            }
            Err(_) => {
                self.metrics().reject(Rejection::Timeout);
                tracing::debug!(listener = %self.gate.name, peer = %self.peer, "handshake timed out");
                None
            }
        }
    }

    /// Waits for the first byte of the client's first request, within the
    /// header-read timeout and until the listener stops; `None` when the
    /// client closed or sent nothing in time (counted as a timeout).
    ///
    /// hyper allocates 16 KiB of buffers for an HTTP/1 connection as soon as
    /// it serves it, and keeps them. A connection opened ahead of use (a
    /// browser's preconnect, an idle pool) holds none until it sends.
    async fn first_byte<I: AsyncRead + Unpin>(&mut self, io: &mut I) -> Option<u8> {
        use tokio::io::AsyncReadExt;
        let mut byte = [0u8; 1];
        let wait = tokio::time::timeout(self.limits().header_timeout.get(), io.read(&mut byte));
        let read = tokio::select! {
            read = wait => read,
            _ = self.stop.wait_for(|stopped| *stopped) => return None,
        };
        match read {
            Ok(Ok(1)) => Some(byte[0]),
            Ok(_) => None,
            Err(_) => {
                self.gate.closed(None, self.peer);
                None
            }
        }
    }

    /// Serves HTTP/1.1 on `io` until the client is done, the header-read or
    /// idle timeout passes, or the listener drains. The first request's
    /// head may take up to twice the header-read timeout: one for its first
    /// byte (see [`Session::first_byte`]), one for the rest.
    pub fn http1<I, S, B>(self, io: I, service: S) -> impl Future<Output = ()>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: HttpService<Incoming, ResBody = B> + 'static,
        S::Error: Into<BoxError>,
        B: Body + 'static,
        B::Error: Into<BoxError>,
    {
        self.serve(Box::new(io), move |io, header_timeout| {
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(io, service)
        })
    }

    /// Serves HTTP/2 when `h2` (negotiated by ALPN), HTTP/1.1 otherwise,
    /// with the same timeouts as [`Session::http1`]. The stream comes boxed
    /// from the handshake, which holds it there (see [`Session::serve`]).
    pub fn http<I, S, B>(self, io: Box<I>, h2: bool, service: S) -> impl Future<Output = ()>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        self.serve(io, move |io, header_timeout| {
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout);
            builder.http2().timer(TokioTimer::new()).max_concurrent_streams(250);
            let builder = if h2 { builder.http2_only() } else { builder.http1_only() };
            // The connection borrows its builder; it owns it here instead.
            builder.serve_connection(io, service).into_owned()
        })
    }

    /// Waits for the first byte, then runs the connection `connect` makes
    /// under the idle timeout and the listener's drain.
    ///
    /// Each connection's task is allocated for its whole life, at the size
    /// of its largest state. So the stream is on the heap (it is then held
    /// once, not copied into each future that serves it), and hyper's
    /// connection (several KiB) is boxed once a request begins: a
    /// connection that waits holds the TLS stream and little else.
    async fn serve<I, C, E>(mut self, mut io: Box<I>, connect: impl FnOnce(Served<I>, Duration) -> C)
    where
        I: AsyncRead + AsyncWrite + Unpin,
        C: hyper_util::server::graceful::GracefulConnection<Error = E>,
        E: Into<BoxError>,
    {
        let Some(first) = self.first_byte(&mut io).await else { return };
        let activity = Arc::new(Activity::default());
        let io = TokioIo::new(Metered::new(io, None, activity.clone()).after(first));
        let conn = connect(io, self.limits().header_timeout.get());
        let Self { peer, gate, watcher, .. } = self;
        let out = Box::pin(until_idle(watcher.watch(conn), gate.limits.idle_timeout.get(), activity)).await;
        gate.closed(out.map(|r| r.map_err(Into::into)), peer);
    }
}

/// What hyper serves: a connection's stream, boxed, with the byte read
/// ahead of it and its activity noted.
type Served<I> = TokioIo<Metered<Box<I>>>;

/// When a connection last moved bytes either way.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    /// Milliseconds since `start` of the last read or write.
    last: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self { start: Instant::now(), last: AtomicU64::new(0) }
    }
}

impl Activity {
    fn touch(&self) {
        self.last.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_until(&self, idle: Duration) -> Instant {
        self.start + Duration::from_millis(self.last.load(Ordering::Relaxed)) + idle
    }
}

pin_project_lite::pin_project! {
    /// Runs `work` until it ends (`Some` of its output), or until nothing
    /// moved on `activity` for `idle` (`None`). A plain future, so that a
    /// connection's task holds `work` once.
    pub struct UntilIdle<F> {
        #[pin]
        work: F,
        #[pin]
        timer: tokio::time::Sleep,
        idle: Duration,
        activity: Arc<Activity>,
    }
}

/// See [`UntilIdle`].
pub fn until_idle<F: Future>(work: F, idle: Duration, activity: Arc<Activity>) -> UntilIdle<F> {
    let timer = tokio::time::sleep_until(activity.idle_until(idle).into());
    UntilIdle { work, timer, idle, activity }
}

impl<F: Future> Future for UntilIdle<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(out) = this.work.poll(cx) {
            return Poll::Ready(Some(out));
        }
        loop {
            std::task::ready!(this.timer.as_mut().poll(cx));
            let until = this.activity.idle_until(*this.idle);
            if until <= Instant::now() {
                return Poll::Ready(None);
            }
            this.timer.as_mut().reset(until.into());
        }
    }
}

/// A stream that notes its activity and counts the bytes it reads.
pub struct Metered<S> {
    inner: S,
    bytes: Option<Arc<AtomicU64>>,
    activity: Arc<Activity>,
    /// A byte read ahead of `inner` (by [`Session::first_byte`]), which the
    /// next read returns.
    ahead: Option<u8>,
}

impl<S> Metered<S> {
    /// Wraps `inner`, adding what it reads to `bytes` when given.
    pub fn new(inner: S, bytes: Option<Arc<AtomicU64>>, activity: Arc<Activity>) -> Self {
        Self { inner, bytes, activity, ahead: None }
    }

    /// The same, with `byte` read ahead of `inner`: the first read returns it.
    fn after(mut self, byte: u8) -> Self {
        self.ahead = Some(byte);
        self
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = match self.ahead.take() {
            Some(byte) if buf.remaining() > 0 => {
                buf.put_slice(&[byte]);
                Poll::Ready(Ok(()))
            }
            ahead => {
                self.ahead = ahead;
                Pin::new(&mut self.inner).poll_read(cx, buf)
            }
        };
        let n = buf.filled().len() - before;
        if n > 0 {
            if let Some(bytes) = &self.bytes {
                bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            self.activity.touch();
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The TLS config of an HTTPS endpoint serving a cert store's certificate
/// over HTTP/1.1, client certificates optional (the admin endpoint, the
/// CA's API). Built by each reload, not per connection.
pub struct HttpsConfig {
    dir: std::path::PathBuf,
    built: arc_swap::ArcSwapOption<rustls::ServerConfig>,
}

impl HttpsConfig {
    /// For `store`'s certificates, rebuilt with each of its reloads.
    pub fn new(store: &CertStore) -> Arc<Self> {
        let config = Arc::new(Self { dir: store.dir().path().to_owned(), built: Default::default() });
        store.attach(&config);
        config
    }

    /// The config for the current certificate; `None` before the first
    /// valid one, or when it could not be built (logged by the reload).
    pub fn current(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.built.load_full()
    }
}

impl Prebuild for HttpsConfig {
    fn rebuild(&self, snapshot: &Arc<Snapshot>) {
        match tls::server_config(&snapshot.set, &ClientAuth::Optional, None) {
            Ok(mut config) => {
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                self.built.store(Some(Arc::new(config)));
            }
            Err(e) => tracing::error!(dir = %self.dir.display(), "TLS config: {e}; keeping the previous one"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::Span;
    use std::convert::Infallible;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An HTTP/1.1 listener on a loopback port answering each request with
    /// its path, serving until its stop sender sends `true`.
    async fn path_echo(
        limits: Limits,
    ) -> (SocketAddr, Arc<ListenerMetrics>, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind a loopback port");
        let addr = listener.local_addr().expect("local address");
        let metrics = Arc::new(ListenerMetrics::default());
        let gate = Gate::new("test", limits, metrics.clone());
        let (stop_tx, stop) = watch::channel(false);
        let served = tokio::spawn(gate.serve(listener, stop, |tcp, session| {
            let service = hyper::service::service_fn(|req: http::Request<Incoming>| async move {
                let path = hyper::body::Bytes::from(req.uri().path().to_owned());
                Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(path)))
            });
            session.http1(tcp, service)
        }));
        (addr, metrics, stop_tx, served)
    }

    /// Reads a response up to the end of `body`, which ends it.
    async fn response(tcp: &mut TcpStream, body: &str) -> String {
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&seen).ends_with(body) {
            let n = tcp.read(&mut buf).await.expect("read a response");
            assert!(n > 0, "closed before the response ended: {:?}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    }

    #[tokio::test]
    async fn the_byte_read_ahead_of_hyper_reaches_it_and_keep_alive_goes_on() {
        let (addr, _, _stop, _) = path_echo(Limits::default()).await;
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        for path in ["/first", "/second"] {
            tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes()).await.expect("send");
            let got = response(&mut tcp, path).await;
            assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");
        }
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed_at_the_header_timeout_and_counted() {
        let limits = Limits { header_timeout: "1s".parse().expect("span"), ..Limits::default() };
        let (addr, metrics, _stop, _) = path_echo(limits).await;
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let mut buf = [0u8; 16];
        assert_eq!(tcp.read(&mut buf).await.expect("read"), 0, "the server closes the silent connection");
        assert_eq!(metrics.timeouts.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn stopping_the_listener_closes_a_connection_that_has_sent_nothing_without_waiting_for_the_drain() {
        let hour: Span = "1h".parse().expect("span");
        let limits = Limits { header_timeout: hour, drain_timeout: hour, ..Limits::default() };
        let (addr, _, stop, served) = path_echo(limits).await;
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        // Accepted in order: once the second is answered, the first is being served.
        let mut answered = TcpStream::connect(addr).await.expect("connect");
        answered.write_all(b"GET /ok HTTP/1.1\r\nHost: t\r\n\r\n").await.expect("send");
        response(&mut answered, "/ok").await;
        drop(answered);
        stop.send(true).expect("the listener is running");
        let mut buf = [0u8; 16];
        let closed = tokio::time::timeout(Duration::from_secs(60), silent.read(&mut buf)).await;
        assert_eq!(closed.expect("closed by the stop, not held for the hour-long drain").expect("read"), 0);
        served.await.expect("the listener's task ends");
    }

    #[test]
    fn authority_hosts_keep_ipv6_brackets_and_drop_ports() {
        assert_eq!(authority_host("[::1]").as_deref(), Some("[::1]"));
        assert_eq!(authority_host("[::1]:8443").as_deref(), Some("[::1]"));
        assert_eq!(authority_host("web:80").as_deref(), Some("web"));
        assert_eq!(authority_host("Shop.Example.com").as_deref(), Some("Shop.Example.com"));
        assert_eq!(authority_host("127.0.0.1:8080").as_deref(), Some("127.0.0.1"));
        // The first was found by fuzzing (sidecar/fuzz, authority_host).
        for bad in ["@llllll[llA+*$lA+*:*]1(:4", "user@web", "", "web:port", "web:", "a b", "[::1", "[web]", "w*b"] {
            assert_eq!(authority_host(bad), None, "{bad:?}");
        }
    }
}
