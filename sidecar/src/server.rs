//! The sidecar's server: resolves and binds every listener, the edges and
//! the admin endpoint, runs them until shutdown, then drains them.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::certdir::CertDir;
use crate::config::{self, Config};
use crate::reload::CertStore;
use crate::{admin, edge, enrol, proxy, serving, tls};

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// The enrolment credential or the CA URL is unusable.
    #[error(transparent)]
    Enrol(#[from] enrol::EnrolError),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Which listener.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A listen name did not resolve.
    #[error("cannot resolve listen address {addr} ({what}): {reason}; use an IP address or a name this container can resolve")]
    Resolve {
        /// The address as configured.
        addr: config::HostPort,
        /// Which listener.
        what: String,
        /// The operating system's reason.
        reason: String,
    },
    /// Two listeners claim the same address.
    #[error("listeners {first} and {second} both bind {addr}; give one of them another address or port")]
    Clash {
        /// The address.
        addr: SocketAddr,
        /// One listener.
        first: String,
        /// The other.
        second: String,
    },
    /// The TLS setup failed.
    #[error(transparent)]
    Tls(#[from] tls::TlsConfigError),
}

/// How long a listen name may take to resolve at start (container DNS can lag).
const RESOLVE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether `ip` is one of this host's addresses (or a wildcard).
fn is_local(ip: std::net::IpAddr) -> bool {
    ip.is_unspecified() || std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// This host's addresses in the IPv4 subnet `cidr` (`10.213.7.16/28`),
/// for subnets of at most 256 addresses; `None` when `cidr` is not one.
fn local_in_subnet(cidr: &str) -> Option<Vec<std::net::IpAddr>> {
    let (base, prefix) = cidr.split_once('/')?;
    let base: std::net::Ipv4Addr = base.parse().ok()?;
    let prefix: u32 = prefix.parse().ok().filter(|p| (24..=32).contains(p))?;
    let first = u32::from(base) & (u32::MAX << (32 - prefix));
    Some(
        (0..1u32 << (32 - prefix))
            .map(|i| std::net::IpAddr::V4((first + i).into()))
            .filter(|ip| is_local(*ip))
            .collect(),
    )
}

/// The addresses to listen on for `addr`: an IP, a name (this host's
/// addresses among those it resolves to), or `SUBNET/PREFIX` (this host's
/// address on that network: a Swarm task cannot resolve its own aliases
/// before it is healthy).
async fn resolve(addr: &config::HostPort, what: &str) -> Result<Vec<SocketAddr>, SidecarError> {
    let deadline = tokio::time::Instant::now() + RESOLVE_PATIENCE;
    if addr.host().contains('/') {
        loop {
            match local_in_subnet(addr.host()) {
                Some(ips) if !ips.is_empty() => {
                    return Ok(ips.into_iter().map(|ip| SocketAddr::new(ip, addr.port())).collect())
                }
                Some(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await
                }
                found => {
                    let reason = match found {
                        None => "not an IPv4 subnet of /24 to /32".to_owned(),
                        Some(_) => "this host has no address in that subnet".to_owned(),
                    };
                    return Err(SidecarError::Resolve { addr: addr.clone(), what: what.to_owned(), reason });
                }
            }
        }
    }
    loop {
        let reason = match tokio::net::lookup_host((addr.host(), addr.port())).await {
            Ok(found) => {
                // A name may also stand for other hosts (a Swarm service's
                // other tasks): only this host's own addresses can be bound.
                let mut found: Vec<SocketAddr> = found.filter(|a| is_local(a.ip())).collect();
                found.sort();
                found.dedup();
                if !found.is_empty() {
                    return Ok(found);
                }
                "no address of this host".to_owned()
            }
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(SidecarError::Resolve { addr: addr.clone(), what: what.to_owned(), reason });
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// Resolves every listen address and binds one socket per port and address,
/// routing connections on a shared wildcard socket by local address.
async fn bind_listeners(listeners: &[Arc<proxy::Listener>]) -> Result<Vec<(TcpListener, proxy::Routes)>, SidecarError> {
    use std::collections::BTreeMap;
    let mut by_port: BTreeMap<u16, Vec<(SocketAddr, Arc<proxy::Listener>)>> = BTreeMap::new();
    for l in listeners {
        for addr in resolve(&l.config.listen, &l.config.name).await? {
            by_port.entry(addr.port()).or_default().push((addr, l.clone()));
        }
    }
    let mut bound = Vec::new();
    for (_, entries) in by_port {
        let mut exact: BTreeMap<SocketAddr, Arc<proxy::Listener>> = BTreeMap::new();
        let mut wildcard: Option<(SocketAddr, Arc<proxy::Listener>)> = None;
        for (addr, l) in entries {
            let taken = if addr.ip().is_unspecified() {
                wildcard.replace((addr, l.clone()))
            } else {
                exact.insert(addr, l.clone()).map(|other| (addr, other))
            };
            if let Some((_, other)) = taken.filter(|(_, o)| !Arc::ptr_eq(o, &l)) {
                return Err(SidecarError::Clash {
                    addr,
                    first: other.config.name.clone(),
                    second: l.config.name.clone(),
                });
            }
        }
        match wildcard {
            Some((addr, l)) => {
                let routes = proxy::Routes {
                    exact: exact.into_iter().map(|(a, l)| (a.ip(), l)).collect(),
                    wildcard: Some(l.clone()),
                };
                bound.push((bind(addr, &l.config.name).await?, routes));
            }
            None => {
                for (addr, l) in exact {
                    let socket = bind(addr, &l.config.name).await?;
                    bound.push((socket, proxy::Routes { exact: vec![(addr.ip(), l)], wildcard: None }));
                }
            }
        }
    }
    Ok(bound)
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, SidecarError> {
    serving::bind(addr).map_err(|source| SidecarError::Bind { addr, what: what.to_owned(), source })
}

/// Runs the sidecar until `shutdown` resolves, then stops accepting and
/// drains open connections (bounded by the drain timeout).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), SidecarError> {
    tls::set_kx_policy(config.kx);
    let store = CertStore::new(CertDir::new(&config.cert_dir));
    let store_for_load = store.clone();
    let _ = tokio::task::spawn_blocking(move || store_for_load.reload()).await;
    if store.current().is_none() {
        tracing::warn!(dir = %config.cert_dir.display(), "no valid certificate yet; waiting for one (not ready)");
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(enrol) = &config.enrol {
        let enroller = enrol::Enroller::new(enrol, &config.cert_dir)?;
        tokio::spawn(enroller.run(stop_rx.clone()));
    }
    let mut listeners = Vec::new();
    let mut tasks = Vec::new();
    for lc in &config.listeners {
        listeners.push(proxy::Listener::new(lc.clone(), config.limits.clone(), store.clone())?);
    }
    for (socket, routes) in bind_listeners(&listeners).await? {
        for l in routes.all() {
            let lc = &l.config;
            let on = socket.local_addr().map(|a| a.to_string()).unwrap_or_default();
            let upstream =
                lc.upstream.as_ref().map_or_else(|| format!("{} routes by Host", lc.routes.len()), |u| u.to_string());
            tracing::info!(listener = %lc.name, mode = ?lc.mode, listen = %lc.listen, on, upstream, "listening");
        }
        tasks.push(tokio::spawn(proxy::serve(socket, routes, stop_rx.clone())));
    }
    let mut edges = Vec::new();
    for ec in &config.edges {
        let edge = edge::Edge::new(ec.clone())?;
        for s in &edge.stores {
            let s = s.clone();
            let _ = tokio::task::spawn_blocking(move || s.reload()).await;
        }
        if let Some(why) = edge.not_ready() {
            tracing::warn!("{why}");
        }
        for s in &edge.stores {
            s.spawn_watch(stop_rx.clone());
        }
        if ec.on_demand.is_some() {
            tasks.push(tokio::spawn(edge.clone().run_on_demand(stop_rx.clone())));
        }
        let https_addrs = resolve(&ec.https_listen, &ec.name).await?;
        let https_port = ec.https_listen.port();
        for addr in https_addrs {
            let socket = bind(addr, &ec.name).await?;
            tracing::info!(edge = %ec.name, %addr, upstream = %ec.upstream, "edge serving HTTPS");
            tasks.push(tokio::spawn(edge.clone().serve_https(socket, config.limits.clone(), stop_rx.clone())));
        }
        if let Some(http) = &ec.http_listen {
            for addr in resolve(http, &ec.name).await? {
                let socket = bind(addr, &ec.name).await?;
                tracing::info!(edge = %ec.name, %addr, "edge redirecting HTTP to HTTPS");
                tasks.push(tokio::spawn(edge.clone().serve_http(
                    socket,
                    https_port,
                    config.limits.clone(),
                    stop_rx.clone(),
                )));
            }
        }
        edges.push(edge);
    }
    if let Some(addr) = config.admin {
        let socket = bind(addr, "admin").await?;
        tracing::info!(%addr, "admin endpoint on https://{addr}/readyz");
        let admin = Arc::new(admin::Admin::new(store.clone(), listeners.clone(), edges.clone())?);
        tasks.push(tokio::spawn(admin.serve(socket, config.limits.clone(), stop_rx.clone())));
    }
    let watcher = store.spawn_watch(stop_rx.clone());

    shutdown.await;
    tracing::info!("shutting down: no new connections, draining open ones");
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let _ = watcher.await;
    Ok(())
}
