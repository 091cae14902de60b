//! The ports an image listens on when the compose file does not say:
//! the image's `EXPOSE` from a local engine when one answers (through
//! [`ImagePorts`]), else a table of well-known images.
//!
//! The table's source: the `EXPOSE` lines of the Docker Official Images'
//! Dockerfiles (github.com/docker-library and the images' own repositories,
//! as of 2026) and, for images without `EXPOSE`, their documented default
//! ports. The protocol column says which ports speak HTTP.

use crate::options::Protocol;

/// Looks up the ports an image exposes; the `ca` binary asks the local
/// Docker engine.
pub trait ImagePorts {
    /// The TCP ports `image` exposes, or `None` when the image is unknown here.
    fn exposed(&self, image: &str) -> Option<Vec<u16>>;
}

/// No engine: only the table.
pub struct NoEngine;

impl ImagePorts for NoEngine {
    fn exposed(&self, _image: &str) -> Option<Vec<u16>> {
        None
    }
}

use Protocol::{Http, Tcp};

/// Repository base names (without registry, namespace or tag) and their ports.
const WELL_KNOWN: &[(&str, &[(u16, Protocol)])] = &[
    ("postgres", &[(5432, Tcp)]),
    ("postgis", &[(5432, Tcp)]),
    ("timescaledb", &[(5432, Tcp)]),
    ("pgvector", &[(5432, Tcp)]),
    ("mysql", &[(3306, Tcp)]),
    ("mariadb", &[(3306, Tcp)]),
    ("percona-server", &[(3306, Tcp)]),
    ("redis", &[(6379, Tcp)]),
    ("redis-stack-server", &[(6379, Tcp)]),
    ("valkey", &[(6379, Tcp)]),
    ("keydb", &[(6379, Tcp)]),
    ("dragonfly", &[(6379, Tcp)]),
    ("mongo", &[(27017, Tcp)]),
    ("mongodb-community-server", &[(27017, Tcp)]),
    ("memcached", &[(11211, Tcp)]),
    ("rabbitmq", &[(5672, Tcp), (15672, Http)]),
    ("elasticsearch", &[(9200, Http), (9300, Tcp)]),
    ("opensearch", &[(9200, Http), (9300, Tcp)]),
    ("kibana", &[(5601, Http)]),
    ("opensearch-dashboards", &[(5601, Http)]),
    ("logstash", &[(5044, Tcp), (9600, Http)]),
    ("clickhouse-server", &[(8123, Http), (9000, Tcp), (9009, Tcp)]),
    ("clickhouse", &[(8123, Http), (9000, Tcp), (9009, Tcp)]),
    ("kafka", &[(9092, Tcp)]),
    ("cp-kafka", &[(9092, Tcp)]),
    ("zookeeper", &[(2181, Tcp)]),
    ("cp-zookeeper", &[(2181, Tcp)]),
    ("nats", &[(4222, Tcp), (8222, Http)]),
    ("minio", &[(9000, Http), (9001, Http)]),
    ("nginx", &[(80, Http)]),
    ("nginx-unprivileged", &[(8080, Http)]),
    ("httpd", &[(80, Http)]),
    ("caddy", &[(80, Http), (443, Tcp)]),
    ("traefik", &[(80, Http), (443, Tcp)]),
    ("haproxy", &[(80, Http)]),
    ("grafana", &[(3000, Http)]),
    ("prometheus", &[(9090, Http)]),
    ("alertmanager", &[(9093, Http)]),
    ("node-exporter", &[(9100, Http)]),
    ("cadvisor", &[(8080, Http)]),
    ("loki", &[(3100, Http)]),
    ("tempo", &[(3200, Http)]),
    ("pushgateway", &[(9091, Http)]),
    ("blackbox-exporter", &[(9115, Http)]),
    ("jaeger", &[(16686, Http), (4317, Tcp), (4318, Http)]),
    ("all-in-one", &[(16686, Http), (4317, Tcp), (4318, Http)]),
    ("influxdb", &[(8086, Http)]),
    ("consul", &[(8500, Http)]),
    ("vault", &[(8200, Http)]),
    ("etcd", &[(2379, Tcp)]),
    ("cassandra", &[(9042, Tcp)]),
    ("couchdb", &[(5984, Http)]),
    ("neo4j", &[(7474, Http), (7687, Tcp)]),
    ("wordpress", &[(80, Http)]),
    ("ghost", &[(2368, Http)]),
    ("nextcloud", &[(80, Http)]),
    ("drupal", &[(80, Http)]),
    ("joomla", &[(80, Http)]),
    ("phpmyadmin", &[(80, Http)]),
    ("adminer", &[(8080, Http)]),
    ("keycloak", &[(8080, Http)]),
    ("gitea", &[(3000, Http), (22, Tcp)]),
    ("mailhog", &[(1025, Tcp), (8025, Http)]),
    ("mailpit", &[(1025, Tcp), (8025, Http)]),
    ("meilisearch", &[(7700, Http)]),
    ("typesense", &[(8108, Http)]),
    ("qdrant", &[(6333, Http), (6334, Tcp)]),
    ("registry", &[(5000, Http)]),
    ("sonarqube", &[(9000, Http)]),
    ("jenkins", &[(8080, Http), (50000, Tcp)]),
    ("tomcat", &[(8080, Http)]),
    ("solr", &[(8983, Http)]),
    ("portainer-ce", &[(9000, Http), (9443, Tcp)]),
    ("mosquitto", &[(1883, Tcp)]),
    ("eclipse-mosquitto", &[(1883, Tcp)]),
    ("pihole", &[(80, Http)]),
    ("authentik", &[(9000, Http), (9443, Tcp)]),
];

/// The base name of an image reference: `ghcr.io/org/redis:7-alpine@sha...` -> `redis`.
pub fn base_name(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    let last = no_digest.rsplit('/').next().unwrap_or(no_digest);
    last.split(':').next().unwrap_or(last)
}

/// The table's ports for `image`, if it is a well-known one.
pub fn well_known(image: &str) -> Option<&'static [(u16, Protocol)]> {
    let base = base_name(image);
    WELL_KNOWN.iter().find(|(name, _)| *name == base).map(|(_, ports)| *ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_images_by_their_base() {
        assert_eq!(base_name("ghcr.io/org/redis:7-alpine@sha256:abc"), "redis");
        assert_eq!(base_name("postgres"), "postgres");
        assert_eq!(base_name("localhost:5000/team/api:1.2"), "api");
        assert_eq!(well_known("docker.io/library/postgres:16-alpine").unwrap(), &[(5432, Tcp)]);
        assert!(well_known("bitnami/kafka:3.7").is_some());
        assert!(well_known("mycompany/api").is_none());
    }
}
