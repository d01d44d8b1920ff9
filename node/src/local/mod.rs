//! Provinces on loopback: a province directory in a scratch location and its
//! node, started and stopped in-process. The demo, the benchmarks and the
//! tests all run real nodes through this; [`replicas`] adds a province of
//! several replicas on a loopback JetStream cluster.

pub mod replicas;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use hufu_certs::{Identity, LeafOptions, Province, Role};
use hufu_federation::legacy::LegacyFormat;
use hufu_proto::v1::admin_service_client::AdminServiceClient;
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use tonic::transport::Channel;

use crate::client::{self, ClientCert, Target};
use crate::config::NodeConfig;
use crate::init::{self, InitOptions};
use crate::server::RunningNode;

pub struct LocalProvince {
    pub province: Province,
    pub dir: PathBuf,
    pub config: NodeConfig,
    pub node: Option<RunningNode>,
}

impl LocalProvince {
    /// Creates `root/<code>` with `hufu init`, listening on a free loopback port.
    pub fn init(root: &Path, province: Province) -> anyhow::Result<LocalProvince> {
        Self::init_at(root, province, "127.0.0.1:0".parse()?)
    }

    /// Like [`init`](Self::init), listening on `listen`.
    pub fn init_at(
        root: &Path,
        province: Province,
        listen: SocketAddr,
    ) -> anyhow::Result<LocalProvince> {
        let dir = root.join(province.to_string());
        let mut opts = InitOptions::new(province);
        opts.listen = listen;
        opts.metrics_listen = Some("127.0.0.1:0".parse()?);
        let config_path = init::init_province(&dir, &opts)?;
        let config = NodeConfig::load(&config_path)?;
        Ok(LocalProvince {
            province,
            dir,
            config,
            node: None,
        })
    }

    /// Whether the node is running.
    pub fn is_running(&self) -> bool {
        self.node.is_some()
    }

    /// Starts the node. After the first start the same port is reused, so
    /// clients can reconnect after a restart.
    pub async fn start(&mut self) -> anyhow::Result<SocketAddr> {
        self.start_with(None).await
    }

    /// Starts the node on `listener` when given (bound earlier, so that no
    /// other process can take its port meanwhile), else on `config.listen`.
    async fn start_with(
        &mut self,
        listener: Option<std::net::TcpListener>,
    ) -> anyhow::Result<SocketAddr> {
        anyhow::ensure!(
            self.node.is_none(),
            "province {} is already running",
            self.province
        );
        let node = match listener {
            None => crate::server::start(&self.config).await?,
            Some(listener) => {
                listener.set_nonblocking(true)?;
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let metrics = match self.config.metrics_listen {
                    Some(addr) => Some(tokio::net::TcpListener::bind(addr).await?),
                    None => None,
                };
                crate::server::start_on(&self.config, listener, metrics).await?
            }
        };
        let addr = node.addr;
        self.config.listen = addr;
        self.config.client.endpoint = addr.to_string();
        self.node = Some(node);
        Ok(addr)
    }

    /// Graceful stop.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(node) = self.node.take() {
            node.shutdown().await?;
        }
        Ok(())
    }

    pub fn addr(&self) -> anyhow::Result<SocketAddr> {
        self.node
            .as_ref()
            .map(|n| n.addr)
            .with_context(|| format!("province {} is not running", self.province))
    }

    pub fn ca_pem(&self) -> anyhow::Result<String> {
        self.config.read(&self.config.ca_cert)
    }

    /// Where this province's node is reached: the in-process node if
    /// running here, else the configured endpoint (a node in another process).
    pub fn target(&self) -> anyhow::Result<Target> {
        let endpoint = match &self.node {
            Some(node) => node.addr.to_string(),
            None => self.config.client.endpoint.clone(),
        };
        Target::with_ca_pem(&endpoint, self.province, &self.ca_pem()?)
    }

    /// A fresh certificate of this province's CA for `role`/`name`.
    pub fn client_cert(&self, role: Role, name: &str) -> anyhow::Result<ClientCert> {
        self.client_cert_with(role, name, &LeafOptions::default())
    }

    pub fn client_cert_with(
        &self,
        role: Role,
        name: &str,
        opts: &LeafOptions,
    ) -> anyhow::Result<ClientCert> {
        let ca = init::load_ca(&self.dir)?;
        let issued = ca.issue(&Identity::new(self.province, role, name)?, opts)?;
        Ok(ClientCert {
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
        })
    }

    pub async fn channel_as(&self, cert: &ClientCert) -> anyhow::Result<Channel> {
        client::connect(&self.target()?, cert).await
    }

    pub async fn channel(&self, role: Role, name: &str) -> anyhow::Result<Channel> {
        self.channel_as(&self.client_cert(role, name)?).await
    }

    /// An AdminService client with the province's admin certificate.
    pub async fn admin(&self) -> anyhow::Result<AdminServiceClient<Channel>> {
        let cert = ClientCert::load(
            &self.config.path(&self.config.client.admin_cert),
            &self.config.path(&self.config.client.admin_key),
        )?;
        Ok(AdminServiceClient::new(self.channel_as(&cert).await?))
    }

    /// A StatusLookupService client with a terminal certificate of this province.
    pub async fn terminal(&self, name: &str) -> anyhow::Result<StatusLookupServiceClient<Channel>> {
        Ok(StatusLookupServiceClient::new(
            self.channel(Role::Terminal, name).await?,
        ))
    }
}

/// A federation of provinces on loopback: fixed free ports, a genesis trust
/// list signed by every founder, a node per province.
pub struct LocalFederation {
    pub provinces: Vec<LocalProvince>,
    /// Each province's listener, bound at `init` and held until its first
    /// start: on a busy host another process could take a port picked and
    /// released in between.
    reserved: std::collections::HashMap<Province, std::net::TcpListener>,
}

impl LocalFederation {
    /// Creates the provinces under `root` and installs a genesis signed by
    /// all (threshold: a majority). `tune` adjusts each config before start.
    pub fn init(
        root: &Path,
        codes: &[Province],
        tune: impl Fn(&mut NodeConfig),
    ) -> anyhow::Result<LocalFederation> {
        LocalFederation::init_declaring(root, codes, &[], tune)
    }

    /// As [`init`](Self::init), with the legacy code formats some members
    /// declare in the genesis.
    pub fn init_declaring(
        root: &Path,
        codes: &[Province],
        formats: &[(Province, Vec<LegacyFormat>)],
        tune: impl Fn(&mut NodeConfig),
    ) -> anyhow::Result<LocalFederation> {
        use crate::federation::ops;
        let mut provinces = Vec::new();
        let mut reserved = std::collections::HashMap::new();
        for p in codes {
            let listener = crate::ports::loopback_listener()?;
            let listen = listener.local_addr()?;
            reserved.insert(*p, listener);
            let mut province = LocalProvince::init_at(root, *p, listen)?;
            tune(&mut province.config);
            provinces.push(province);
        }
        let mut members = provinces
            .iter()
            .map(|lp| ops::member_of(&lp.config, vec![lp.config.listen.to_string()]))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for m in &mut members {
            if let Some((_, declared)) = formats.iter().find(|(p, _)| *p == m.province) {
                m.legacy_formats = declared.clone();
            }
        }
        let threshold = members.len() / 2 + 1;
        let mut genesis = ops::genesis(members, threshold, None)?;
        for lp in &provinces {
            ops::sign(&lp.config, &mut genesis)?;
        }
        for lp in &provinces {
            ops::install(&lp.config, &genesis)?;
        }
        Ok(LocalFederation {
            provinces,
            reserved,
        })
    }

    pub async fn start_all(&mut self) -> anyhow::Result<()> {
        for p in &mut self.provinces {
            let listener = self.reserved.remove(&p.province);
            p.start_with(listener).await?;
        }
        Ok(())
    }

    /// Starts province `p` on the listener reserved for it when it has not
    /// run yet (on `config.listen` after that).
    pub async fn start(&mut self, p: Province) -> anyhow::Result<SocketAddr> {
        let listener = self.reserved.remove(&p);
        self.provinces
            .iter_mut()
            .find(|x| x.province == p)
            .expect("province in federation")
            .start_with(listener)
            .await
    }

    pub async fn stop_all(&mut self) -> anyhow::Result<()> {
        // Everyone is told first: nodes stopping one by one would each see
        // the others' feeds go down.
        for node in self.provinces.iter().filter_map(|p| p.node.as_ref()) {
            node.state.stop.cancel();
        }
        for p in &mut self.provinces {
            p.stop().await?;
        }
        Ok(())
    }

    pub fn get(&self, p: Province) -> &LocalProvince {
        self.provinces
            .iter()
            .find(|x| x.province == p)
            .expect("province in federation")
    }

    /// The province, to change or to start and stop on its own: its
    /// reserved listener is let go, and it binds `config.listen` itself.
    pub fn get_mut(&mut self, p: Province) -> &mut LocalProvince {
        self.reserved.remove(&p);
        self.provinces
            .iter_mut()
            .find(|x| x.province == p)
            .expect("province in federation")
    }
}
