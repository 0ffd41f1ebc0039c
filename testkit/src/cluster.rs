//! A 3-node `nats-server` cluster with JetStream, for tests that kill a
//! node: each node has its own ports (client, route, monitoring) and store
//! directory, routes to the other two, and restarts on the same ports and
//! store, as a node of a real cluster does after a crash.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::{Store, WAIT, eventually, free_port, log_tail, nats_server_binary, until_ready};

/// One node's ports and process.
struct Node {
    name: String,
    port: u16,
    route_port: u16,
    http_port: u16,
    child: Option<Child>,
    store: Store,
}

/// Three `nats-server -js` processes in one cluster (`testkit`), nodes
/// `n1`, `n2`, `n3`; everything is deleted when the handle drops.
pub struct NatsCluster {
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
    binary: PathBuf,
}

impl NatsCluster {
    /// Starts three nodes and waits until each answers JetStream requests
    /// (which needs the cluster's JetStream meta leader elected). Each node
    /// has its own three ports, nine distinct ones in all; should another
    /// process take one before its node binds it (the node exits with
    /// "address already in use"), the cluster starts again on new ones.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(vec![Store::default(); 3]).await
    }

    /// [`NatsCluster::start`] with node `i`'s store where and as
    /// `stores[i]` says (e.g. each on a [`crate::LazyFs`] of its own, to
    /// cut a node's power); `stores` has one entry per node (3).
    pub async fn start_with(stores: Vec<Store>) -> anyhow::Result<Self> {
        if stores.len() != 3 {
            bail!("a test cluster has 3 nodes, {} stores given", stores.len());
        }
        let mut attempt = 1;
        loop {
            match Self::start_on(Self::pick_ports()?, &stores).await {
                Ok(cluster) => return Ok(cluster),
                Err((error, true)) if attempt < 3 => {
                    eprintln!(
                        "nats cluster: a port was taken ({error:#}); starting again on new ports"
                    );
                    attempt += 1;
                }
                Err((error, _)) => return Err(error),
            }
        }
    }

    /// Nine distinct free ports: each node's client, route and monitoring
    /// port.
    fn pick_ports() -> anyhow::Result<[u16; 9]> {
        let mut ports = [0; 9];
        for i in 0..ports.len() {
            ports[i] = loop {
                let port = free_port()?;
                if !ports[..i].contains(&port) {
                    break port;
                }
            };
        }
        Ok(ports)
    }

    /// One start on these ports (node `n1` the first three: client, route,
    /// monitoring); the error says whether a node found a port taken.
    async fn start_on(ports: [u16; 9], stores: &[Store]) -> Result<Self, (anyhow::Error, bool)> {
        let binary = nats_server_binary().map_err(|e| (e, false))?;
        let dir = tempfile::tempdir()
            .context("creating the cluster directory")
            .map_err(|e| (e, false))?;
        let nodes = ports
            .chunks(3)
            .enumerate()
            .map(|(i, p)| Node {
                name: format!("n{}", i + 1),
                port: p[0],
                route_port: p[1],
                http_port: p[2],
                child: None,
                store: stores[i].clone(),
            })
            .collect();
        let mut cluster = Self { nodes, dir, binary };
        let started = async {
            for i in 0..cluster.nodes.len() {
                cluster.write_config(i)?;
                cluster.spawn(i)?;
            }
            for i in 0..cluster.nodes.len() {
                cluster.wait_ready(i).await?;
            }
            anyhow::Ok(())
        }
        .await;
        match started {
            Ok(()) => Ok(cluster),
            Err(error) => {
                let taken = (0..cluster.nodes.len()).any(|i| {
                    std::fs::read_to_string(cluster.log_path(i))
                        .is_ok_and(|log| log.contains("address already in use"))
                });
                Err((error, taken))
            }
        }
    }

    fn config_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("{}.conf", self.nodes[i].name))
    }

    /// Node `i`'s log file.
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("{}.log", self.nodes[i].name))
    }

    /// Node `i`'s JetStream store directory (its `store_dir`).
    pub fn store_dir(&self, i: usize) -> PathBuf {
        let node = &self.nodes[i];
        node.store
            .dir
            .clone()
            .unwrap_or_else(|| self.dir.path().join(&node.name).join("store"))
    }

    fn write_config(&self, i: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        let store = self.store_dir(i);
        // The node's own setting, else the stack's default durability.
        let sync = node
            .store
            .sync_interval
            .clone()
            .or_else(|| crate::nats_durability().sync_interval().map(str::to_owned))
            .map(|interval| format!(", sync_interval: {interval:?}"))
            .unwrap_or_default();
        let routes: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.name != node.name)
            .map(|n| format!("nats-route://127.0.0.1:{}", n.route_port))
            .collect();
        let text = format!(
            "server_name: {name}\nlisten: \"127.0.0.1:{port}\"\nhttp: \"127.0.0.1:{http}\"\n\
             jetstream {{ store_dir: {store:?}{sync} }}\n\
             cluster {{\n  name: testkit\n  listen: \"127.0.0.1:{route}\"\n  routes: [{routes}]\n}}\n",
            name = node.name,
            port = node.port,
            http = node.http_port,
            store = store.display().to_string(),
            route = node.route_port,
            routes = routes.join(", "),
        );
        let path = self.config_path(i);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let log = self.log_path(i);
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(self.config_path(i))
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting `{}`", self.binary.display()))?;
        self.nodes[i].child = Some(child);
        Ok(())
    }

    async fn wait_ready(&mut self, i: usize) -> anyhow::Result<()> {
        let log = self.log_path(i);
        let url = self.node_url(i);
        let name = self.nodes[i].name.clone();
        until_ready(
            self.nodes[i].child.as_mut(),
            WAIT,
            "the cluster node answered JetStream requests",
            || format!("{}:\n{}", log.display(), log_tail(&log)),
            || {
                let url = url.clone();
                async move {
                    let client = async_nats::connect(&url).await.ok()?;
                    crate::js_answers(&async_nats::jetstream::new(client))
                        .await
                        .then_some(())
                }
            },
        )
        .await
        .with_context(|| format!("nats-server cluster node `{name}`"))
    }

    /// How many nodes the cluster has (3).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: a cluster has nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`'s server name (`n1`, `n2`, `n3` for `i` = 0, 1, 2).
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The index of the node called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// `nats://127.0.0.1:<port>` of node `i`.
    pub fn node_url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    /// Every node's URL, comma-separated, starting with node `first` (the
    /// list a service takes in `--nats-url`; clients try them in order).
    pub fn url_from(&self, first: usize) -> String {
        (0..self.nodes.len())
            .map(|k| self.node_url((first + k) % self.nodes.len()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every node's URL, comma-separated, node 0 first.
    pub fn url(&self) -> String {
        self.url_from(0)
    }

    /// Node `i`'s monitoring port (`/varz`, `/jsz`, `/healthz`).
    pub fn http_port(&self, i: usize) -> u16 {
        self.nodes[i].http_port
    }

    /// Node `i`'s process id while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    /// A client that knows every node (and fails over between them).
    pub async fn connect(&self) -> anyhow::Result<async_nats::Client> {
        let urls: Vec<String> = (0..self.nodes.len()).map(|i| self.node_url(i)).collect();
        async_nats::ConnectOptions::new()
            .retain_servers_order()
            .connect(urls.as_slice())
            .await
            .context("connecting to the test cluster")
    }

    /// Kills node `i` with SIGKILL (no shutdown, as in a crash) and waits
    /// for the process to exit.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `i` again (killing it first if it runs) on its ports and
    /// store, and waits until it answers JetStream requests.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        self.spawn(i)?;
        self.wait_ready(i).await
    }

    /// The name of the node leading `stream` (its Raft group's leader), as
    /// the stream's info reports it through `client`; `None` while the
    /// stream has no leader (an election in progress).
    pub async fn stream_leader(client: &async_nats::Client, stream: &str) -> Option<String> {
        let js = async_nats::jetstream::new(client.clone());
        let ask = async {
            let mut stream = js.get_stream(stream).await.ok()?;
            let info = stream.info().await.ok()?;
            info.cluster.as_ref()?.leader.clone()
        };
        tokio::time::timeout(Duration::from_secs(2), ask)
            .await
            .ok()
            .flatten()
            .filter(|l| !l.is_empty())
    }

    /// Waits until `stream` has a leader and returns its node's index.
    pub async fn wait_for_leader(
        &self,
        client: &async_nats::Client,
        stream: &str,
        timeout: Duration,
    ) -> anyhow::Result<usize> {
        let leader = eventually(timeout, &format!("a leader of `{stream}`"), || async {
            Self::stream_leader(client, stream).await
        })
        .await?;
        match self.index_of(&leader) {
            Some(i) => Ok(i),
            None => bail!("`{stream}` is led by `{leader}`, not a node of this cluster"),
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_node_whose_port_is_taken_is_told_apart_so_the_cluster_starts_again() {
        let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = holder.local_addr().unwrap().port();
        let mut ports = NatsCluster::pick_ports().unwrap();
        ports[7] = taken; // n3's route port
        let Err((error, port_taken)) = NatsCluster::start_on(
            ports,
            &[Store::default(), Store::default(), Store::default()],
        )
        .await
        else {
            panic!("a cluster started with n3's route port held by another socket");
        };
        assert!(port_taken, "{error:#}");
        assert!(format!("{error:#}").contains("`n3`"), "{error:#}");

        // On fresh ports the same start succeeds.
        drop(holder);
        ports = NatsCluster::pick_ports().unwrap();
        let cluster = NatsCluster::start_on(
            ports,
            &[Store::default(), Store::default(), Store::default()],
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
        assert_eq!(cluster.len(), 3);
    }

    #[tokio::test]
    async fn a_stream_at_three_replicas_survives_its_leader_killed_and_restarted() {
        let mut cluster = NatsCluster::start().await.unwrap();
        let client = cluster.connect().await.unwrap();
        let js = async_nats::jetstream::new(client.clone());
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "R3".into(),
            subjects: vec!["r3.>".into()],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .unwrap();
        let leader = cluster.wait_for_leader(&client, "R3", WAIT).await.unwrap();
        js.publish("r3.a", "before".into())
            .await
            .unwrap()
            .await
            .unwrap();
        cluster.kill(leader);
        let old = cluster.name(leader).to_owned();
        let new_leader = eventually(WAIT, "another node to lead `R3`", || async {
            NatsCluster::stream_leader(&client, "R3")
                .await
                .filter(|l| *l != old)
        })
        .await
        .unwrap();
        assert!(cluster.index_of(&new_leader).is_some(), "{new_leader}");
        js.publish("r3.a", "while one node is down".into())
            .await
            .unwrap()
            .await
            .unwrap();
        cluster.restart(leader).await.unwrap();
        let node = async_nats::connect(cluster.node_url(leader)).await.unwrap();
        let stream = async_nats::jetstream::new(node);
        let messages = eventually(WAIT, "the restarted node to see the message", || {
            let stream = stream.clone();
            async move {
                let info = stream
                    .get_stream("R3")
                    .await
                    .ok()?
                    .info()
                    .await
                    .ok()?
                    .clone();
                (info.state.messages == 2).then_some(info.state.messages)
            }
        })
        .await
        .unwrap();
        assert_eq!(messages, 2);
    }
}
