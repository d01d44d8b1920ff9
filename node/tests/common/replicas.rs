//! A province of several node replicas on a real three-server JetStream
//! cluster (nats-server processes on loopback), beside a peer province.

use std::path::PathBuf;
use std::time::Duration;

use hufu_certs::Province;
use hufu_node::config::{NodeConfig, ReplicationConfig};
use hufu_node::local::{LocalFederation, LocalProvince, free_port};
use hufu_node::replication::cluster::NatsCluster;
use hufu_node::replication::setup::{ReplicaOptions, init_replica};

/// The replicated province and its peer.
pub const REPLICATED: &str = "440000";
pub const PEER: &str = "110000";

pub struct Replicated {
    /// Dropped last: the nodes stop before the NATS servers.
    pub scratch: tempfile::TempDir,
    pub nats: NatsCluster,
    /// The replicated province's first node, and the peer province.
    pub federation: LocalFederation,
    /// Configurations of the replicated province's other nodes.
    pub replica_configs: Vec<PathBuf>,
}

/// The write log settings of the tests: writes give up after 2 s.
pub fn replication(nats: &NatsCluster) -> ReplicationConfig {
    let mut config = ReplicationConfig::new(nats.urls());
    config.ack_timeout_ms = 2000;
    config
}

/// Starts the NATS cluster and makes the federation and `replicas` nodes of
/// the replicated province in all (none started).
pub async fn replicated(replicas: usize) -> Replicated {
    let scratch = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(&scratch.path().join("nats"), 3)
        .await
        .unwrap();
    let settings = replication(&nats);
    let federation =
        super::quick_federation(&scratch.path().join("fed"), &[REPLICATED, PEER], |c| {
            if c.province == super::province(REPLICATED) {
                c.replication = Some(settings.clone());
            }
        });
    let first = federation.get(super::province(REPLICATED));
    let replica_configs = (2..=replicas)
        .map(|n| {
            let opts = ReplicaOptions {
                node_name: format!("node-{n}"),
                listen: format!("127.0.0.1:{}", free_port().unwrap())
                    .parse()
                    .unwrap(),
                metrics_listen: None,
                hosts: vec![],
            };
            let dir = scratch.path().join(format!("replica-{n}"));
            init_replica(&first.config, &dir, &opts, settings.clone()).unwrap()
        })
        .collect();
    Replicated {
        scratch,
        nats,
        federation,
        replica_configs,
    }
}

impl Replicated {
    /// The other replicas as in-process provinces (not started).
    pub fn local_replicas(&self) -> Vec<LocalProvince> {
        self.replica_configs
            .iter()
            .map(|path| {
                let config = NodeConfig::load(path).unwrap();
                LocalProvince {
                    province: config.province,
                    dir: config.base_dir.clone(),
                    config,
                    node: None,
                }
            })
            .collect()
    }

    pub fn province(&self) -> Province {
        super::province(REPLICATED)
    }
}

/// Polls for at most this long for replicas to converge.
pub const CONVERGE_WITHIN: Duration = Duration::from_secs(20);
