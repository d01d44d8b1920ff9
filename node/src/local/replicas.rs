//! A province of several node replicas on loopback, beside other provinces:
//! a three-server JetStream cluster, a federation whose first province
//! writes through it, and that province's other replicas, made from its
//! directory. The replicas demo, the replicas benchmark and the tests run
//! through this.

use anyhow::Context;
use hufu_federation::legacy::LegacyFormat;
use std::path::{Path, PathBuf};

use hufu_certs::Province;

use super::{LocalFederation, LocalProvince};
use crate::config::{NodeConfig, ReplicationConfig};
use crate::replication::cluster::NatsCluster;
use crate::replication::setup::{ReplicaOptions, init_replica};

/// NATS servers in the local cluster: three, so that one may fail.
pub const NATS_SERVERS: usize = 3;

/// How long [`ReplicatedFederation::write_log_ready`] waits.
pub const WRITE_LOG_READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(60);

pub struct ReplicatedFederation {
    /// Province `provinces[0]` of it has replicas.
    pub federation: LocalFederation,
    /// That province's other replicas (not started).
    pub replicas: Vec<LocalProvince>,
    /// Their configuration files, for replicas run as `hufu serve`.
    pub replica_configs: Vec<PathBuf>,
    /// The write log's servers; killed when dropped, after the nodes stop.
    pub nats: NatsCluster,
    /// Each replica's listener, bound at `init` and held until the replica
    /// first starts in this process, so that no other process can take its
    /// port meanwhile. A replica run as a `hufu serve` process binds its
    /// port itself: [`release_listeners`](Self::release_listeners) first.
    reserved: Vec<Option<std::net::TcpListener>>,
}

impl ReplicatedFederation {
    /// Starts the NATS cluster under `root` and creates `provinces` (none
    /// started); `provinces[0]` gets `replicas` nodes in all, whose
    /// `[replication]` is `replication` (the cluster's servers are filled
    /// in). `tune` adjusts every province's config, as for
    /// [`LocalFederation::init`].
    pub async fn init(
        root: &Path,
        provinces: &[Province],
        replicas: usize,
        replication: impl Fn(Vec<String>) -> ReplicationConfig,
        tune: impl Fn(&mut NodeConfig),
    ) -> anyhow::Result<ReplicatedFederation> {
        Self::init_declaring(root, provinces, &[], replicas, replication, tune).await
    }

    /// As [`init`](Self::init), with the legacy code formats some members
    /// declare in the genesis.
    pub async fn init_declaring(
        root: &Path,
        provinces: &[Province],
        formats: &[(Province, Vec<LegacyFormat>)],
        replicas: usize,
        replication: impl Fn(Vec<String>) -> ReplicationConfig,
        tune: impl Fn(&mut NodeConfig),
    ) -> anyhow::Result<ReplicatedFederation> {
        let nats = NatsCluster::start(&root.join("nats"), NATS_SERVERS).await?;
        let settings = replication(nats.urls());
        let replicated = provinces[0];
        let federation =
            LocalFederation::init_declaring(&root.join("federation"), provinces, formats, |c| {
                tune(c);
                if c.province == replicated {
                    c.replication = Some(settings.clone());
                }
            })?;
        let first = federation.get(replicated);
        let mut replica_configs = Vec::new();
        let mut local = Vec::new();
        let mut reserved = Vec::new();
        for n in 2..=replicas {
            let listener = crate::ports::loopback_listener()?;
            let opts = ReplicaOptions {
                node_name: format!("node-{n}"),
                listen: listener.local_addr()?,
                metrics_listen: Some("127.0.0.1:0".parse()?),
                hosts: vec![],
            };
            let path = init_replica(
                &first.config,
                &root.join(format!("{replicated}-node-{n}")),
                &opts,
                settings.clone(),
            )?;
            let config = NodeConfig::load(&path)?;
            local.push(LocalProvince {
                province: replicated,
                dir: config.base_dir.clone(),
                config,
                node: None,
            });
            replica_configs.push(path);
            reserved.push(Some(listener));
        }
        Ok(ReplicatedFederation {
            federation,
            replicas: local,
            replica_configs,
            nats,
            reserved,
        })
    }

    /// Lets go of the replicas' reserved listeners, for replicas about to
    /// run as `hufu serve` processes from [`replica_configs`](Self::replica_configs):
    /// each binds its configured port itself, right after.
    pub fn release_listeners(&mut self) {
        self.reserved.clear();
    }

    /// Starts every province's node and every replica, once the
    /// replicated province's write log is ready (see
    /// [`write_log_ready`](Self::write_log_ready)).
    pub async fn start_all(&mut self) -> anyhow::Result<()> {
        self.federation.start_all().await?;
        self.write_log_ready().await?;
        for (n, r) in self.replicas.iter_mut().enumerate() {
            let listener = self.reserved.get_mut(n).and_then(Option::take);
            r.start_with(listener).await?;
        }
        Ok(())
    }

    /// Waits, for at most [`WRITE_LOG_READY_WITHIN`], until the started
    /// first replica's write log answers: the province's stream made and
    /// its leader elected. Until then a write is refused with UNAVAILABLE,
    /// and on a busy machine placing a stream of three copies can outlast
    /// a write's timeout.
    pub async fn write_log_ready(&self) -> anyhow::Result<()> {
        let first = self.federation.get(self.province());
        let log = first
            .node
            .as_ref()
            .and_then(|n| n.state.write_log.clone())
            .context("the replicated province's first node is not started, or has no write log")?;
        let start = std::time::Instant::now();
        loop {
            match log.kept().await {
                Ok(_) => return Ok(()),
                Err(e) if start.elapsed() > WRITE_LOG_READY_WITHIN => {
                    anyhow::bail!(
                        "the province's write log was not ready within {WRITE_LOG_READY_WITHIN:?}: {e}"
                    )
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
    }

    /// Starts replica `n` of `replicas` (again), on its reserved listener
    /// the first time.
    pub async fn start_replica(&mut self, n: usize) -> anyhow::Result<()> {
        let listener = self.reserved.get_mut(n).and_then(Option::take);
        self.replicas[n].start_with(listener).await?;
        Ok(())
    }

    /// Stops every node (the NATS servers stop when this is dropped).
    pub async fn stop_all(&mut self) -> anyhow::Result<()> {
        for r in &mut self.replicas {
            r.stop().await?;
        }
        self.federation.stop_all().await
    }

    /// The replicated province.
    pub fn province(&self) -> Province {
        self.federation.provinces[0].province
    }

    /// Every replica of the replicated province, the first one first.
    pub fn all_replicas(&self) -> Vec<&LocalProvince> {
        std::iter::once(self.federation.get(self.province()))
            .chain(&self.replicas)
            .collect()
    }
}
