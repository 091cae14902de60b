//! Docker discovery: containers labelled `lanyard.identity=<name>` become
//! managed identities, found by listing at start and by following the event
//! stream. Optional labels:
//!
//! | label | meaning |
//! |---|---|
//! | `lanyard.dns` | comma-separated DNS SANs (default: the name) |
//! | `lanyard.ttl` | certificate lifetime, such as `24h` |
//! | `lanyard.certdir` | absolute cert dir to write (default: `<cert_root>/<name>`) |
//! | `lanyard.reload` | `signal:SIGHUP` (any signal) or `restart`, for apps that cannot hot-reload |

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bollard::query_parameters::{
    EventsOptions, InspectContainerOptions, KillContainerOptions, ListContainersOptions, RestartContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use lanyard_sidecar::certdir::CertDir;
use lanyard_sidecar::span::Span;
use tokio::sync::{mpsc, watch};

use crate::issue::{KeySource, LeafRequest};
use crate::keys::KeyType;
use crate::serve::schedule::{Managed, Scheduler};

/// The label that marks a container for Lanyard.
pub const IDENTITY_LABEL: &str = "lanyard.identity";

/// What to do to a container after its certificate rotates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReloadAction {
    /// Send this signal (`SIGHUP`, ...).
    Signal(String),
    /// Restart the container.
    Restart,
}

/// A labelled container, as Lanyard understands it.
#[derive(Clone, Debug)]
pub struct Discovered {
    /// The issuance template and cert dir.
    pub managed: Managed,
    /// The reload action, if any.
    pub reload: Option<ReloadAction>,
}

/// Reads the Lanyard labels of a container; errors name the label.
pub fn parse_labels(labels: &HashMap<String, String>, cert_root: &Path) -> Result<Option<Discovered>, String> {
    let Some(name) = labels.get(IDENTITY_LABEL) else { return Ok(None) };
    let name = name.parse().map_err(|e| format!("label {IDENTITY_LABEL}: {e}"))?;
    let dns = match labels.get("lanyard.dns") {
        Some(list) => Some(
            list.split(',')
                .map(|d| d.trim().parse().map_err(|e| format!("label lanyard.dns: {e}")))
                .collect::<Result<_, _>>()?,
        ),
        None => None,
    };
    let ttl: Span = labels
        .get("lanyard.ttl")
        .map_or("24h", String::as_str)
        .parse()
        .map_err(|e| format!("label lanyard.ttl: {e}"))?;
    let out_dir = match labels.get("lanyard.certdir") {
        Some(p) if Path::new(p).is_absolute() => PathBuf::from(p),
        Some(p) => return Err(format!("label lanyard.certdir: {p:?} must be an absolute path")),
        None => cert_root.join(format!("{name}")),
    };
    let reload = match labels.get("lanyard.reload").map(String::as_str) {
        None => None,
        Some("restart") => Some(ReloadAction::Restart),
        Some(s) => match s.strip_prefix("signal:") {
            Some(sig) if !sig.is_empty() && sig.bytes().all(|b| b.is_ascii_alphanumeric()) => {
                Some(ReloadAction::Signal(sig.to_owned()))
            }
            _ => return Err(format!("label lanyard.reload: {s:?}; use signal:SIGHUP or restart")),
        },
    };
    let request =
        LeafRequest { name, dns, ips: Vec::new(), spiffe: None, ttl, key: KeySource::Generate(KeyType::EcdsaP256) };
    Ok(Some(Discovered { managed: Managed { request, out_dir: CertDir::new(out_dir) }, reload }))
}

/// Follows Docker and keeps the scheduler's identities in step with it.
pub struct Discovery {
    docker: Docker,
    scheduler: Arc<Scheduler>,
    cert_root: PathBuf,
    /// container id → (identity, reload action)
    containers: Mutex<HashMap<String, (String, Option<ReloadAction>)>>,
    /// Identities that came from Docker (config identities are never removed).
    discovered: Mutex<HashSet<String>>,
}

impl Discovery {
    /// Connects to the Docker socket.
    pub fn connect(socket: &str, scheduler: Arc<Scheduler>, cert_root: PathBuf) -> Result<Arc<Self>, String> {
        // Streams stay open for days; the timeout must not cut them.
        let docker = Docker::connect_with_unix(socket, 10 * 365 * 86_400, bollard::API_DEFAULT_VERSION)
            .map_err(|e| format!("cannot connect to Docker at {socket}: {e}"))?;
        Ok(Arc::new(Self { docker, scheduler, cert_root, containers: Mutex::default(), discovered: Mutex::default() }))
    }

    fn add(&self, id: &str, labels: &HashMap<String, String>) {
        match parse_labels(labels, &self.cert_root) {
            Ok(None) => {}
            Ok(Some(found)) => {
                let name = found.managed.name();
                tracing::info!(container = %short(id), identity = %name, dir = %found.managed.out_dir.path().display(), "discovered");
                lock(&self.containers).insert(id.to_owned(), (name.clone(), found.reload));
                lock(&self.discovered).insert(name.clone());
                if let Err(e) = self.scheduler.upsert(found.managed) {
                    tracing::error!(identity = %name, "cannot manage discovered identity: {e}");
                }
            }
            Err(e) => tracing::error!(container = %short(id), "ignoring container: {e}"),
        }
    }

    fn gone(&self, id: &str) {
        let Some((name, _)) = lock(&self.containers).remove(id) else { return };
        let still_used = lock(&self.containers).values().any(|(n, _)| *n == name);
        if !still_used && lock(&self.discovered).remove(&name) {
            tracing::info!(identity = %name, "container gone; no longer managed (its cert dir is kept)");
            if let Err(e) = self.scheduler.remove(&name) {
                tracing::error!(identity = %name, "{e}");
            }
        }
    }

    /// Lists labelled containers, then follows events until `stop`.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        self.scheduler.on_rotate(move |identity| {
            let _ = tx.send(identity.to_owned());
        });
        let this = self.clone();
        tokio::spawn(async move {
            while let Some(identity) = rx.recv().await {
                this.reload_containers(&identity).await;
            }
        });
        loop {
            self.list().await;
            let filters = HashMap::from([
                ("type".to_owned(), vec!["container".to_owned()]),
                ("event".to_owned(), vec!["start".to_owned(), "die".to_owned(), "destroy".to_owned()]),
                ("label".to_owned(), vec![IDENTITY_LABEL.to_owned()]),
            ]);
            let mut events = self.docker.events(Some(EventsOptions { filters: Some(filters), ..Default::default() }));
            loop {
                let event = tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    e = events.next() => e,
                };
                match event {
                    Some(Ok(msg)) => {
                        let actor = msg.actor.unwrap_or_default();
                        let id = actor.id.unwrap_or_default();
                        match msg.action.as_deref() {
                            Some("start") => self.add(&id, &actor.attributes.unwrap_or_default()),
                            Some("die" | "destroy") => self.gone(&id),
                            _ => {}
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!("Docker event stream failed: {e}; reconnecting");
                        break;
                    }
                    None => break,
                }
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
    }

    async fn list(&self) {
        let filters = HashMap::from([("label".to_owned(), vec![IDENTITY_LABEL.to_owned()])]);
        match self
            .docker
            .list_containers(Some(ListContainersOptions { filters: Some(filters), ..Default::default() }))
            .await
        {
            Ok(list) => {
                for c in list {
                    if let Some(id) = c.id {
                        self.add(&id, &c.labels.unwrap_or_default());
                    }
                }
            }
            Err(e) => tracing::warn!("cannot list Docker containers: {e}"),
        }
    }

    async fn reload_containers(&self, identity: &str) {
        let targets: Vec<(String, ReloadAction)> = lock(&self.containers)
            .iter()
            .filter(|(_, (name, _))| name == identity)
            .filter_map(|(id, (_, action))| action.clone().map(|a| (id.clone(), a)))
            .collect();
        for (id, action) in targets {
            let running = self
                .docker
                .inspect_container(&id, None::<InspectContainerOptions>)
                .await
                .ok()
                .and_then(|c| c.state.and_then(|s| s.running))
                .unwrap_or(false);
            if !running {
                continue;
            }
            let result = match &action {
                ReloadAction::Signal(sig) => {
                    self.docker.kill_container(&id, Some(KillContainerOptions { signal: sig.clone() })).await
                }
                ReloadAction::Restart => self.docker.restart_container(&id, None::<RestartContainerOptions>).await,
            };
            match result {
                Ok(()) => tracing::info!(container = %short(&id), identity, ?action, "reloaded after rotation"),
                Err(e) => tracing::error!(container = %short(&id), identity, ?action, "reload failed: {e}"),
            }
        }
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_and_errors_name_the_label() {
        let root = Path::new("/certs");
        let labels = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert!(parse_labels(&labels(&[]), root).unwrap().is_none());
        let d = parse_labels(
            &labels(&[(IDENTITY_LABEL, "web"), ("lanyard.dns", "web, web.local"), ("lanyard.reload", "signal:SIGHUP")]),
            root,
        )
        .unwrap()
        .unwrap();
        assert_eq!(d.managed.out_dir.path(), Path::new("/certs/web"));
        assert_eq!(d.managed.request.dns_names().len(), 2);
        assert_eq!(d.reload, Some(ReloadAction::Signal("SIGHUP".into())));
        for (k, v) in [
            ("lanyard.ttl", "0s"),
            ("lanyard.reload", "reboot"),
            ("lanyard.certdir", "rel/dir"),
            ("lanyard.dns", "a..b"),
        ] {
            let e = parse_labels(&labels(&[(IDENTITY_LABEL, "web"), (k, v)]), root).unwrap_err();
            assert!(e.contains(k), "{e}");
        }
    }
}
