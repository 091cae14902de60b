//! The data path: inbound (mTLS in, plaintext to the app) and outbound
//! (plaintext from the app, mTLS to the upstream) listeners.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{timeout, Instant};

use crate::certinfo::CertInfo;
use crate::config::{HostPort, InboundTls, Limits, ListenerConfig, Mode};
use crate::copy::Bidirectional;
use crate::identity::PeerId;
use crate::metrics::{ListenerMetrics, Rejection};
use crate::proxy_protocol;
use crate::reload::{CertStore, Prebuild, Snapshot};
use crate::serving::{self, Activity, Metered};
use crate::tls::{self, ClientAuth, Resumption, ServerCheck};
use crate::verify::peer_identity;

/// The listeners that share one socket. A connection goes to the listener
/// bound to the exact address it arrived on, else to the wildcard one; this
/// is how an outbound listener on a private address and an inbound listener
/// on `0.0.0.0` can share a port.
#[derive(Default)]
pub struct Routes {
    /// Listeners bound to one address.
    pub exact: Vec<(IpAddr, Arc<Listener>)>,
    /// The listener bound to the unspecified address, if any.
    pub wildcard: Option<Arc<Listener>>,
}

impl Routes {
    fn pick(&self, local: Option<IpAddr>) -> Option<&Arc<Listener>> {
        let exact = local.and_then(|ip| self.exact.iter().find(|(a, _)| *a == ip).map(|(_, l)| l));
        exact.or(self.wildcard.as_ref())
    }

    /// Every listener on this socket.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Listener>> {
        self.exact.iter().map(|(_, l)| l).chain(self.wildcard.iter())
    }
}

/// Accepts on `socket` until `stop` turns true, then drains every listener
/// it served.
pub async fn serve(socket: TcpListener, routes: Routes, mut stop: watch::Receiver<bool>) {
    while let Some((tcp, peer)) = crate::serving::next_connection(&socket, &mut stop).await {
        // The local address (a getsockname call) only matters when a listener is bound to one.
        let local = if routes.exact.is_empty() { None } else { tcp.local_addr().ok().map(|a| a.ip().to_canonical()) };
        match routes.pick(local) {
            Some(listener) => listener.accept(tcp, peer),
            None => tracing::debug!(%peer, "no listener for this local address; closed"),
        }
    }
    drop(socket);
    for listener in routes.all() {
        listener.gate.drain().await;
    }
}

/// Longest HTTP request head read to route or redirect a request.
const MAX_HEAD: usize = 16 * 1024;

/// How long the addresses of `plain_from` services are trusted before they
/// are looked up again.
const PLAIN_FROM_TTL: Duration = Duration::from_secs(5);

/// TLS configs built for one snapshot.
struct Built {
    snapshot: Arc<Snapshot>,
    server: Option<Arc<rustls::ServerConfig>>,
    /// Outbound: one client config per route, or one for the listener's upstream.
    clients: Vec<Arc<rustls::ClientConfig>>,
}

impl Prebuild for Listener {
    fn rebuild(&self, snapshot: &Arc<Snapshot>) {
        self.built.store(Some(Arc::new(self.build(snapshot))));
    }
}

/// Where an outbound connection goes.
struct Target<'a> {
    upstream: &'a HostPort,
    server_name: Option<&'a PeerId>,
    client: Arc<rustls::ClientConfig>,
    /// mTLS; else plaintext to a service outside the mesh.
    tls: bool,
}

/// One running listener: its settings, metrics and cached TLS config.
pub struct Listener {
    /// Its `[[listener]]` table.
    pub config: ListenerConfig,
    /// Its handshake, connection and byte counters.
    pub metrics: Arc<ListenerMetrics>,
    /// Its connection cap.
    gate: Arc<serving::Gate>,
    limits: Limits,
    built: ArcSwapOption<Built>,
    /// Session cache and ticket key, with the CRL they were issued under: a
    /// new CRL starts a new cache so that a revoked client cannot resume.
    resumption: std::sync::Mutex<(Vec<rustls::pki_types::CertificateRevocationListDer<'static>>, Resumption)>,
    /// Addresses of the `plain_from` services, and when they were looked up.
    plain_peers: tokio::sync::Mutex<(Option<Instant>, Vec<IpAddr>)>,
}

impl Listener {
    /// A listener over `store`'s certificates.
    pub fn new(
        config: ListenerConfig,
        limits: Limits,
        store: Arc<CertStore>,
    ) -> Result<Arc<Self>, tls::TlsConfigError> {
        let metrics = Arc::<ListenerMetrics>::default();
        let listener = Arc::new(Self {
            gate: serving::Gate::new(config.name.clone(), limits.clone(), metrics.clone()),
            config,
            metrics,
            limits,
            built: ArcSwapOption::empty(),
            resumption: std::sync::Mutex::new((Vec::new(), Resumption::new()?)),
            plain_peers: tokio::sync::Mutex::new((None, Vec::new())),
        });
        store.attach(&listener);
        Ok(listener)
    }

    /// The TLS configs built by the reload that published the current snapshot.
    fn configs(&self) -> Option<Arc<Built>> {
        self.built.load_full()
    }

    fn build(&self, snapshot: &Arc<Snapshot>) -> Built {
        let (server, clients) = match self.config.mode {
            Mode::Inbound => {
                let auth = match self.config.tls {
                    InboundTls::Tls => ClientAuth::Optional,
                    _ => ClientAuth::Required(self.config.allow.clone().into()),
                };
                let resumption = {
                    let mut guard = self.resumption.lock().unwrap_or_else(|e| e.into_inner());
                    if guard.0 != snapshot.set.crls {
                        if let Ok(fresh) = Resumption::new() {
                            *guard = (snapshot.set.crls.clone(), fresh);
                        }
                    }
                    guard.1.clone()
                };
                let server = tls::server_config(&snapshot.set, &auth, Some(&resumption)).map(|mut c| {
                    c.alpn_protocols = self.alpn();
                    c
                });
                (
                    server.map_err(|e| tracing::error!(listener = %self.config.name, "{e}")).ok().map(Arc::new),
                    Vec::new(),
                )
            }
            Mode::Outbound => {
                let names: Vec<Option<&PeerId>> = if self.config.routes.is_empty() {
                    vec![self.config.server_name.as_ref()]
                } else {
                    self.config.routes.iter().map(|r| r.server_name.as_ref()).collect()
                };
                let clients = names
                    .into_iter()
                    .map(|name| {
                        let check = name.map_or(ServerCheck::Hostname, |id| ServerCheck::Identity(id.clone()));
                        tls::client_config(&snapshot.set, &check).map(|mut c| {
                            c.alpn_protocols = self.alpn();
                            Arc::new(c)
                        })
                    })
                    .collect::<Result<Vec<_>, _>>();
                (None, clients.map_err(|e| tracing::error!(listener = %self.config.name, "{e}")).unwrap_or_default())
            }
        };
        Built { snapshot: snapshot.clone(), server, clients }
    }

    fn alpn(&self) -> Vec<Vec<u8>> {
        if self.config.http {
            return vec![b"http/1.1".to_vec()];
        }
        self.config.alpn.iter().map(|p| p.as_bytes().to_vec()).collect()
    }

    /// Handles one accepted connection on its own task, within the connection cap.
    fn accept(self: &Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let Some(admitted) = self.gate.admit(peer) else { return };
        let this = self.clone();
        tokio::spawn(async move {
            let _admitted = admitted;
            let _ = tcp.set_nodelay(true);
            match this.config.mode {
                Mode::Inbound => this.inbound(tcp, peer).await,
                Mode::Outbound => this.outbound(tcp).await,
            }
        });
    }

    async fn inbound(&self, tcp: TcpStream, peer: std::net::SocketAddr) {
        if self.config.tls == InboundTls::None || self.is_plain_peer(peer.ip()).await {
            let Some(upstream) = self.connect_upstream(self.upstream()).await else { return };
            self.ended(self.pipe(tcp, upstream).await);
            return;
        }
        if self.config.tls == InboundTls::Tls && self.config.http {
            let mut first = [0u8; 1];
            match timeout(self.limits.handshake_timeout.get(), tcp.peek(&mut first)).await {
                // Boxed, as is HTTP mode below: a rarer path's state does not size every connection's task.
                Ok(Ok(1)) if first[0] != TLS_HANDSHAKE => return Box::pin(self.redirect_to_https(tcp)).await,
                Ok(Ok(1)) => {}
                _ => return,
            }
        }
        let Some((snapshot, server)) = self.configs().and_then(|b| Some((b.snapshot.clone(), b.server.clone()?)))
        else {
            tracing::warn!(listener = %self.config.name, %peer, "refused: no valid certificate loaded yet");
            return;
        };
        let local = if self.config.proxy_protocol { tcp.local_addr().ok() } else { None };
        let accept = tokio_rustls::TlsAcceptor::from(server).accept(tcp);
        let (tls, (info, version)) = match timeout(self.limits.handshake_timeout.get(), accept).await {
            Err(_) => return self.rejected(Rejection::Timeout, &peer.to_string(), "handshake timed out"),
            Ok(Err(e)) => return self.handshake_failed(&e, &peer.to_string()),
            Ok(Ok(tls)) => {
                let accepted = self.accepted(tls.get_ref().1, peer);
                (tls, accepted)
            }
        };
        let Some(mut upstream) = self.connect_upstream(self.upstream()).await else { return };
        if self.config.http {
            let own = snapshot.set.leaf.uris.first().map(String::as_str);
            let identity = info.as_ref().and_then(|i| crate::http::xfcc_value(own, i));
            if identity.is_none() && self.config.tls != InboundTls::Tls {
                return;
            }
            let activity = Arc::new(Activity::default());
            let client = Metered::new(tls, Some(self.metrics.bytes_in.clone()), activity.clone());
            // Body bytes towards the client are not metered in HTTP mode; requests are.
            let proxied = Box::pin(self.until_idle(crate::http::proxy(client, upstream, identity), activity));
            if let Some(Err(e)) = self.ended(proxied.await) {
                tracing::debug!(listener = %self.config.name, "http proxy: {e}");
            }
            return;
        }
        if self.config.proxy_protocol {
            let (Some(info), Some(local)) = (&info, local) else { return };
            let identity = peer_identity(info);
            let cn = info.subject.strip_prefix("CN=").map(|cn| cn.split(',').next().unwrap_or(cn));
            let header = proxy_protocol::encode(
                peer,
                local,
                &proxy_protocol::PeerInfo { tls_version: version, common_name: cn, identity: &identity },
            );
            if upstream.write_all(&header).await.is_err() {
                self.metrics.upstream_errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        // The client's certificate details are not kept for the connection's life.
        drop((info, snapshot));
        self.ended(self.pipe(tls, upstream).await);
    }

    /// Counts and logs an accepted handshake; the client's certificate and
    /// the TLS version.
    fn accepted(&self, conn: &rustls::ServerConnection, peer: SocketAddr) -> (Option<CertInfo>, &'static str) {
        self.metrics.handshake_done(conn);
        let info = conn.peer_certificates().and_then(|c| c.first()).and_then(|c| CertInfo::from_der(c).ok());
        let caller = info.as_ref().map(peer_identity);
        let group = tls::group_label(conn.negotiated_key_exchange_group().map(|g| g.name()));
        tracing::info!(listener = %self.config.name, %peer, identity = %caller.as_deref().unwrap_or("none"), group = %group, "accepted");
        let version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "TLSv1.3",
        };
        (info, version)
    }

    async fn outbound(&self, mut app: TcpStream) {
        let Some(built) = self.configs().filter(|b| !b.clients.is_empty()) else {
            tracing::warn!(listener = %self.config.name, "refused: no valid certificate loaded yet");
            return;
        };
        // A routed listener reads the first request head to find its Host.
        let mut head = Vec::new();
        let target = if self.config.routes.is_empty() {
            let tls = self.config.tls != InboundTls::None;
            Target {
                upstream: self.upstream(),
                server_name: self.config.server_name.as_ref(),
                client: built.clients[0].clone(),
                tls,
            }
        } else {
            // Boxed: its read buffer is not kept in the task once the head is in.
            let Some(host) =
                Box::pin(self.read_head(&mut app, &mut head)).await.and_then(|_| request_target(&head).map(|(h, _)| h))
            else {
                return respond(
                    &mut app,
                    "400 Bad Request",
                    "lanyard sidecar: a request with a Host header was expected\n",
                )
                .await;
            };
            let host = host_without_port(&host).to_ascii_lowercase();
            let Some(i) = self.config.routes.iter().position(|r| r.host.iter().any(|h| h.eq_ignore_ascii_case(&host)))
            else {
                tracing::warn!(listener = %self.config.name, host, "no route for this Host");
                let body = format!("lanyard sidecar: no upstream for Host {host:?} on this port\n");
                return respond(&mut app, "502 Bad Gateway", &body).await;
            };
            let route = &self.config.routes[i];
            let tls = route.server_name.is_some();
            Target {
                upstream: &route.upstream,
                server_name: route.server_name.as_ref(),
                client: built.clients[i].clone(),
                tls,
            }
        };
        let Some(mut upstream) = self.connect_upstream(target.upstream).await else { return };
        if !target.tls {
            // A service outside the mesh: plaintext, as the app sent it.
            if !head.is_empty() && upstream.write_all(&head).await.is_err() {
                return;
            }
            self.ended(self.pipe(app, upstream).await);
            return;
        }
        let sni = match target.server_name {
            Some(PeerId::Dns(d)) => ServerName::try_from(d.to_string()),
            _ => ServerName::try_from(target.upstream.host().to_owned()),
        };
        let Ok(sni) = sni else { return };
        let connect = tokio_rustls::TlsConnector::from(target.client).connect(sni, upstream);
        let mut tls = match timeout(self.limits.handshake_timeout.get(), connect).await {
            Err(_) => return self.rejected(Rejection::Timeout, &target.upstream.to_string(), "handshake timed out"),
            Ok(Err(e)) => return self.handshake_failed(&e, &target.upstream.to_string()),
            Ok(Ok(tls)) => tls,
        };
        self.metrics.handshake_done(tls.get_ref().1);
        if !head.is_empty() && tls.write_all(&head).await.is_err() {
            return;
        }
        self.ended(self.pipe(app, tls).await);
    }

    /// The upstream of a listener that has one (every listener but a routed outbound one).
    fn upstream(&self) -> &HostPort {
        self.config.upstream.as_ref().expect("checked: only routed outbound listeners have no upstream")
    }

    /// Whether `ip` belongs to one of the `plain_from` services, looking
    /// their names up again when the last look-up is stale or misses.
    async fn is_plain_peer(&self, ip: IpAddr) -> bool {
        if self.config.plain_from.is_empty() {
            return false;
        }
        let ip = ip.to_canonical();
        let mut cache = self.plain_peers.lock().await;
        let fresh = cache.0.is_some_and(|at| at.elapsed() < PLAIN_FROM_TTL);
        let recent = cache.0.is_some_and(|at| at.elapsed() < Duration::from_secs(1));
        if cache.1.contains(&ip) && fresh {
            return true;
        }
        if !recent {
            let mut found = Vec::new();
            for name in &self.config.plain_from {
                if let Ok(Ok(addrs)) =
                    timeout(Duration::from_secs(2), tokio::net::lookup_host((name.as_str(), 0))).await
                {
                    found.extend(addrs.map(|a| a.ip().to_canonical()));
                }
            }
            *cache = (Some(Instant::now()), found);
        }
        cache.1.contains(&ip)
    }

    /// Reads from `stream` into `head` until the end of the request head.
    async fn read_head(&self, stream: &mut TcpStream, head: &mut Vec<u8>) -> Option<()> {
        use tokio::io::AsyncReadExt;
        let read = async {
            let mut chunk = [0u8; 2048];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                if head.len() >= MAX_HEAD {
                    return None;
                }
                let n = stream.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
                head.extend_from_slice(&chunk[..n]);
            }
            Some(())
        };
        timeout(self.limits.handshake_timeout.get(), read).await.ok().flatten()
    }

    /// Answers a plain-HTTP request on a TLS port with a redirect to the same URL over HTTPS.
    async fn redirect_to_https(&self, mut tcp: TcpStream) {
        let mut head = Vec::new();
        let Some((host, path)) = self.read_head(&mut tcp, &mut head).await.and_then(|_| request_target(&head)) else {
            return respond(&mut tcp, "400 Bad Request", "this port speaks HTTPS\n").await;
        };
        let location = format!("https://{host}{path}");
        let reply = format!(
            "HTTP/1.1 308 Permanent Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let _ = tcp.write_all(reply.as_bytes()).await;
        let _ = tcp.shutdown().await;
    }

    fn handshake_failed(&self, e: &io::Error, peer: &str) {
        let why = self.metrics.handshake_failed(e);
        tracing::warn!(listener = %self.config.name, peer, reason = why.label(), event = "refused", "handshake rejected: {e}");
    }

    fn rejected(&self, why: Rejection, peer: &str, detail: &str) {
        self.metrics.reject(why);
        tracing::warn!(listener = %self.config.name, peer, reason = why.label(), event = "refused", "handshake rejected: {detail}");
    }

    async fn connect_upstream(&self, upstream: &HostPort) -> Option<TcpStream> {
        let target = (upstream.host(), upstream.port());
        match timeout(self.limits.connect_timeout.get(), TcpStream::connect(target)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Some(s)
            }
            Ok(Err(e)) => {
                self.metrics.upstream_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(listener = %self.config.name, %upstream, "upstream connect failed: {e}");
                None
            }
            Err(_) => {
                self.metrics.upstream_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(listener = %self.config.name, %upstream, "upstream connect timed out");
                None
            }
        }
    }

    /// Copies both ways until both sides close or the idle timeout passes.
    /// A plain function returning the copy's future, so that the
    /// connection's task holds the two streams once (an `async fn` would
    /// keep its arguments beside the future they moved into).
    fn pipe<A, B>(&self, a: A, b: B) -> serving::UntilIdle<Bidirectional<Metered<A>, Metered<B>>>
    where
        A: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        let activity = Arc::new(Activity::default());
        let a = Metered::new(a, Some(self.metrics.bytes_in.clone()), activity.clone());
        let b = Metered::new(b, Some(self.metrics.bytes_out.clone()), activity.clone());
        self.until_idle(Bidirectional::new(a, b), activity)
    }

    /// `work`, ended after the idle timeout with nothing moved on `activity`.
    fn until_idle<F: std::future::Future>(&self, work: F, activity: Arc<Activity>) -> serving::UntilIdle<F> {
        serving::until_idle(work, self.limits.idle_timeout.get(), activity)
    }

    /// Counts and logs a connection [`Listener::until_idle`] ended.
    fn ended<T>(&self, out: Option<T>) -> Option<T> {
        if out.is_none() {
            self.metrics.timeouts.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(listener = %self.config.name, "idle timeout");
        }
        out
    }
}

/// The first byte of a TLS record carrying a handshake (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

/// The `Host` (with its port, as sent) and path of an HTTP/1.x request head.
fn request_target(head: &[u8]) -> Option<(String, String)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(head).ok()?;
    let path = req.path.filter(|p| p.starts_with('/')).unwrap_or("/").to_owned();
    let host = req.headers.iter().find(|h| h.name.eq_ignore_ascii_case("host"))?;
    let host = std::str::from_utf8(host.value).ok()?.trim();
    let valid = !host.is_empty() && host.parse::<http::uri::Authority>().is_ok();
    valid.then(|| (host.to_owned(), path))
}

/// `users` of `users:8080`, `::1` of `[::1]:8080`.
fn host_without_port(host: &str) -> String {
    serving::authority_host(host)
        .map_or_else(|| host.to_owned(), |h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
}

/// A short plain-text HTTP answer, then close.
async fn respond(stream: &mut TcpStream, status: &str, body: &str) {
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certdir::CertDir;

    fn listener(name: &str, store: &Arc<CertStore>) -> Arc<Listener> {
        let config: ListenerConfig = toml::from_str(&format!(
            "name = \"{name}\"\nmode = \"inbound\"\nlisten = \"0.0.0.0:1\"\nupstream = \"127.0.0.1:2\"\n"
        ))
        .expect("listener config");
        Listener::new(config, Limits::default(), store.clone()).expect("listener")
    }

    #[test]
    fn routes_pick_the_exact_address_then_the_wildcard() {
        let store = CertStore::new(CertDir::new("/nonexistent"));
        let private: IpAddr = "10.213.0.2".parse().unwrap();
        let name = |routes: &Routes, local: Option<IpAddr>| routes.pick(local).map(|l| l.config.name.clone());
        let routes = Routes { exact: vec![(private, listener("out", &store))], wildcard: Some(listener("in", &store)) };
        assert_eq!(name(&routes, Some(private)).as_deref(), Some("out"));
        assert_eq!(name(&routes, Some("10.213.0.3".parse().unwrap())).as_deref(), Some("in"));
        assert_eq!(name(&routes, None).as_deref(), Some("in"));
        let exact_only = Routes { exact: vec![(private, listener("out", &store))], wildcard: None };
        assert_eq!(name(&exact_only, Some("127.0.0.1".parse().unwrap())), None);
        assert_eq!(routes.all().count(), 2);
    }

    #[test]
    fn hosts_lose_their_port_and_brackets_for_routing() {
        assert_eq!(host_without_port("users:8080"), "users");
        assert_eq!(host_without_port("[::1]:8080"), "::1");
        assert_eq!(host_without_port("[::1]"), "::1");
        assert_eq!(host_without_port("users"), "users");
    }

    /// Every idle connection holds its task: the two streams, once, and a
    /// few words. (An `async fn` copy held its buffers and its streams two
    /// or three times over: 13.8 KiB a task.)
    #[tokio::test]
    async fn a_connection_task_holds_its_streams_once() {
        let store = CertStore::new(CertDir::new("/nonexistent"));
        let l = listener("in", &store);
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = || TcpStream::connect(socket.local_addr().unwrap());
        let (a, b) = (connect().await.unwrap(), connect().await.unwrap());
        let peer = a.local_addr().unwrap();
        let pipe = l.pipe(a, b);
        assert!(std::mem::size_of_val(&pipe) < 512, "a plain pipe is {} bytes", std::mem::size_of_val(&pipe));
        drop(pipe);
        let (this, tcp) = (l.clone(), connect().await.unwrap());
        let task = async move {
            match this.config.mode {
                Mode::Inbound => this.inbound(tcp, peer).await,
                Mode::Outbound => this.outbound(tcp).await,
            }
        };
        // 3.3 KiB today, of which the TLS connection is 1.2 KiB.
        let size = std::mem::size_of_val(&task);
        assert!(size < 4096, "a connection's task is {size} bytes");
    }
}
