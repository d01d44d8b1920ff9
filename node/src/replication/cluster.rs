//! A JetStream cluster of `nats-server` processes on loopback, for
//! `hufu demo --replicas`, `hufu bench replicas` and the tests: real
//! servers, each with its own store directory, on ports picked free.
//!
//! Cluster routes must be named in each server's configuration before it
//! starts, so ports are picked (bound and released) first; should another
//! process take one in between, the cluster is started again on new ports.
//! Every server is killed when the cluster is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// The program started for each server.
pub const NATS_SERVER: &str = "nats-server";

/// Where Debian installs it, for a PATH without the sbin directories.
const DEBIAN_NATS_SERVER: &str = "/usr/sbin/nats-server";

/// The `nats-server` to run: from PATH, else Debian's.
fn program() -> &'static str {
    let on_path = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(NATS_SERVER).is_file()));
    if !on_path && Path::new(DEBIAN_NATS_SERVER).is_file() {
        DEBIAN_NATS_SERVER
    } else {
        NATS_SERVER
    }
}

/// How long a cluster has to elect its JetStream leader.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// Whether `nats-server` can be run, with its version line.
pub fn nats_server_version() -> Option<String> {
    let out = Command::new(program()).arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The message for a machine without `nats-server`.
pub fn missing_nats_server() -> String {
    format!(
        "{NATS_SERVER} is not on PATH: install it (Debian and Ubuntu: apt-get install nats-server) to run replicas on a local JetStream cluster"
    )
}

struct Server {
    client_port: u16,
    /// Where the other servers' routes connect (unused by a lone server).
    route_port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

pub struct NatsCluster {
    servers: Vec<Server>,
}

/// Mutual TLS for the servers' client port: the servers present `cert`
/// (signed by `ca`) and admit only clients whose certificate `ca` signed.
/// `client_cert` and `client_key` are what the cluster itself uses to see
/// that JetStream answers. All are PEM files.
#[derive(Clone, Debug)]
pub struct NatsTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// What a client must show to the servers.
#[derive(Clone, Copy, Default)]
struct Access<'a> {
    user: Option<(&'a str, &'a str)>,
    tls: Option<&'a NatsTls>,
}

impl NatsCluster {
    /// Starts `size` servers under `dir` and waits until JetStream answers
    /// at each.
    pub async fn start(dir: &Path, size: usize) -> anyhow::Result<NatsCluster> {
        NatsCluster::start_as(dir, size, Access::default()).await
    }

    /// As [`start`](Self::start), the servers' client port and the routes
    /// between them speaking only mutual TLS as `tls` says.
    pub async fn start_with_tls(
        dir: &Path,
        size: usize,
        tls: &NatsTls,
    ) -> anyhow::Result<NatsCluster> {
        let access = Access {
            user: None,
            tls: Some(tls),
        };
        NatsCluster::start_as(dir, size, access).await
    }

    /// As [`start`](Self::start), the servers accepting only clients that
    /// give `user` (name, password).
    pub async fn start_with_user(
        dir: &Path,
        size: usize,
        user: Option<(&str, &str)>,
    ) -> anyhow::Result<NatsCluster> {
        NatsCluster::start_as(dir, size, Access { user, tls: None }).await
    }

    async fn start_as(dir: &Path, size: usize, access: Access<'_>) -> anyhow::Result<NatsCluster> {
        anyhow::ensure!(size >= 1, "a cluster needs at least one server");
        nats_server_version().with_context(missing_nats_server)?;
        let mut last = None;
        for attempt in 0..3 {
            let mut cluster =
                NatsCluster::configure(&dir.join(format!("try-{attempt}")), size, access)?;
            for i in 0..size {
                cluster.start_server(i)?;
            }
            match cluster.wait_ready_as(READY_WITHIN, access).await {
                Ok(()) => return Ok(cluster),
                Err(err) => last = Some(err),
            }
        }
        Err(last
            .expect("three attempts")
            .context("the NATS cluster did not start"))
    }

    /// Picks ports and writes each server's configuration.
    fn configure(dir: &Path, size: usize, access: Access<'_>) -> anyhow::Result<NatsCluster> {
        // All ports are held at once so that no two are the same.
        let held = (0..size * 2)
            .map(|_| crate::ports::loopback_listener())
            .collect::<std::io::Result<Vec<_>>>()?;
        let ports = held
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<Vec<_>>>()?;
        drop(held);
        let routes = (0..size)
            .map(|i| format!("\"nats-route://127.0.0.1:{}\"", ports[size + i]))
            .collect::<Vec<_>>()
            .join(", ");
        let mut servers = Vec::new();
        for i in 0..size {
            let home = dir.join(format!("n{}", i + 1));
            std::fs::create_dir_all(&home)
                .with_context(|| format!("cannot create {}", home.display()))?;
            let mut authorization = match access.user {
                // The user in an account of its own, with JetStream.
                Some((name, password)) => format!(
                    "accounts {{\n  HUFU {{\n    jetstream: enabled\n    users: [{{ user: \"{name}\", password: \"{password}\" }}]\n  }}\n}}\n"
                ),
                None => String::new(),
            };
            // With TLS, clients and the routes between servers both speak
            // mutual TLS: each server shows its certificate to the others
            // as it does to clients, and checks theirs against the same CA.
            let tls_block = access.tls.map(|tls| {
                format!(
                    "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 2\n}}\n",
                    tls.cert.display(),
                    tls.key.display(),
                    tls.ca.display(),
                )
            });
            if let Some(block) = &tls_block {
                authorization.push_str(block);
            }
            // One server is a standalone JetStream server: with a cluster
            // block it would wait for routes that never come.
            let cluster = if size > 1 {
                format!(
                    "cluster {{\n  name: \"hufu\"\n  listen: \"127.0.0.1:{route}\"\n  routes: [{routes}]\n{tls}}}\n",
                    route = ports[size + i],
                    tls = tls_block.as_deref().unwrap_or(""),
                )
            } else {
                String::new()
            };
            let text = format!(
                "server_name: \"hufu-n{n}\"\nlisten: \"127.0.0.1:{client}\"\n{authorization}jetstream {{\n  store_dir: \"{store}\"\n  max_memory_store: 64MB\n  max_file_store: 1GB\n}}\n{cluster}",
                n = i + 1,
                client = ports[i],
                store = home.join("jetstream").display(),
            );
            let config = home.join("nats.conf");
            std::fs::write(&config, text)?;
            servers.push(Server {
                client_port: ports[i],
                route_port: ports[size + i],
                config,
                log: home.join("nats.log"),
                child: None,
            });
        }
        Ok(NatsCluster { servers })
    }

    /// Starts server `i` (again, after [`kill`](Self::kill)).
    pub fn start_server(&mut self, i: usize) -> anyhow::Result<()> {
        let server = &mut self.servers[i];
        anyhow::ensure!(server.child.is_none(), "NATS server {i} is running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&server.log)?;
        let child = Command::new(program())
            .arg("-c")
            .arg(&server.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(missing_nats_server)?;
        server.child = Some(child);
        Ok(())
    }

    /// Kills server `i` with SIGKILL, as a crash would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.servers[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Where every server listens for the other servers' routes.
    pub fn route_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.servers
            .iter()
            .map(|s| std::net::SocketAddr::from(([127, 0, 0, 1], s.route_port)))
            .collect()
    }

    /// The client URL of every server.
    pub fn urls(&self) -> Vec<String> {
        (0..self.servers.len()).map(|i| self.url(i)).collect()
    }

    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.servers[i].client_port)
    }

    /// Waits until every running server answers a JetStream request (the
    /// cluster has a meta leader).
    pub async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        self.wait_ready_as(within, Access::default()).await
    }

    async fn wait_ready_as(&mut self, within: Duration, access: Access<'_>) -> anyhow::Result<()> {
        let start = Instant::now();
        for i in 0..self.servers.len() {
            if self.servers[i].child.is_none() {
                continue;
            }
            let url = self.url(i);
            loop {
                if let Some(child) = self.servers[i].child.as_mut()
                    && let Some(status) = child.try_wait()?
                {
                    let log = std::fs::read_to_string(&self.servers[i].log).unwrap_or_default();
                    anyhow::bail!("NATS server {url} exited ({status}): {}", tail(&log));
                }
                if jetstream_answers(&url, access).await {
                    break;
                }
                anyhow::ensure!(
                    start.elapsed() < within,
                    "NATS server {url} did not answer JetStream requests within {within:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Every server answers, but a stream on all of them can be placed
        // only once the cluster's leader knows each as a peer: until then
        // creating one fails ("no suitable peers for placement").
        let running = self.servers.iter().filter(|s| s.child.is_some()).count();
        if running > 1 {
            let url = self.url(0);
            while !stream_placed(&url, running, access).await {
                anyhow::ensure!(
                    start.elapsed() < within,
                    "the NATS cluster could not place a stream on its {running} servers within {within:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }
}

/// A client of `url` as `access` says.
async fn connect(url: &str, access: Access<'_>) -> Option<async_nats::Client> {
    let mut options = async_nats::ConnectOptions::new();
    if let Some((name, password)) = access.user {
        options = options.user_and_password(name.into(), password.into());
    }
    if let Some(tls) = access.tls {
        options = options
            .require_tls(true)
            .add_root_certificates(tls.ca.clone())
            .add_client_certificate(tls.client_cert.clone(), tls.client_key.clone());
    }
    options
        .connection_timeout(Duration::from_millis(500))
        .connect(url)
        .await
        .ok()
}

/// Whether a stream of `replicas` replicas can be created (and is deleted
/// again) through `url`.
async fn stream_placed(url: &str, replicas: usize, access: Access<'_>) -> bool {
    const PROBE: &str = "HUFU_READY_PROBE";
    let attempt = async {
        let js = async_nats::jetstream::new(connect(url, access).await?);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: PROBE.into(),
            subjects: vec!["hufu.ready.probe".into()],
            num_replicas: replicas,
            storage: async_nats::jetstream::stream::StorageType::Memory,
            ..Default::default()
        })
        .await
        .ok()?;
        js.delete_stream(PROBE).await.ok()
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .is_some()
}

/// Whether `url` answers a JetStream account request without an error.
/// Raw JSON: the client's typed account info expects fields that servers
/// older than 2.10 do not send.
async fn jetstream_answers(url: &str, access: Access<'_>) -> bool {
    let attempt = async {
        let client = connect(url, access).await?;
        let reply = client.request("$JS.API.INFO", "".into()).await.ok()?;
        let json: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
        json.get("error").is_none().then_some(())
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .is_some()
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
    }
}
