//! The ports images expose, read from the local Docker engine (never
//! pulled: only images the engine already has are inspected).

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use lanyard_compose::images::ImagePorts;

/// Ports of the images a local engine knows, looked up once before the transform.
#[derive(Debug, Default)]
pub struct EngineImages {
    exposed: HashMap<String, Vec<u16>>,
}

impl EngineImages {
    /// Inspects `images` on the engine at `socket`; an engine that does not
    /// answer within two seconds, or an image it does not have, yields nothing.
    pub fn inspect<'a>(socket: &str, images: impl IntoIterator<Item = &'a str>) -> Self {
        let images: Vec<String> = images.into_iter().map(str::to_owned).collect();
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            return Self::default();
        };
        let exposed = runtime.block_on(async {
            let Ok(docker) = Docker::connect_with_unix(socket, 2, bollard::API_DEFAULT_VERSION) else {
                return HashMap::new();
            };
            if tokio::time::timeout(Duration::from_secs(2), docker.ping()).await.map_or(true, |r| r.is_err()) {
                return HashMap::new();
            }
            let mut found = HashMap::new();
            for image in images {
                let Ok(Ok(info)) = tokio::time::timeout(Duration::from_secs(2), docker.inspect_image(&image)).await
                else {
                    continue;
                };
                let ports = info
                    .config
                    .and_then(|c| c.exposed_ports)
                    .map(|p| p.keys().filter_map(|k| k.strip_suffix("/tcp")?.parse().ok()).collect::<Vec<u16>>())
                    .unwrap_or_default();
                found.insert(image, ports);
            }
            found
        });
        Self { exposed }
    }
}

impl ImagePorts for EngineImages {
    fn exposed(&self, image: &str) -> Option<Vec<u16>> {
        self.exposed.get(image).cloned()
    }
}
