//! NATS and ClickHouse for the local stack: is one reachable at the
//! configured URL, and if not (and the URL is on this machine), start one
//! from `PATH` with its data under `.agentmesh/`.

use std::net::TcpListener;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::identity::{AuthState, ClickHouseSecrets};
use crate::procs::{self, Home};
use crate::stack;
use broker_config::server::Durability;

/// Where the stack's servers are, and how meshctl authenticates to them.
#[derive(Debug, Clone)]
pub(crate) struct Endpoints {
    /// NATS URL.
    pub nats_url: String,
    /// meshctl's NATS credentials (the operator's seed on a local stack
    /// with authorization; none for `--insecure`).
    pub nats_credentials: broker_config::NatsCredentials,
    /// ClickHouse HTTP URL.
    pub clickhouse_url: String,
    /// ClickHouse user.
    pub clickhouse_user: String,
    /// ClickHouse password.
    pub clickhouse_password: String,
    /// The audit database.
    pub database: String,
}

impl Endpoints {
    /// These endpoints with the local stack's credentials where none were
    /// given: on a stack with authorization meshctl is the operator (its
    /// seed in `home`), and reads ClickHouse as the read-only user (`up`,
    /// which writes the users, picks its own).
    pub(crate) fn with_local_credentials(
        mut self,
        home: &Home,
        is_up: bool,
        insecure: bool,
    ) -> Self {
        let state = AuthState::new(home);
        if !insecure && !self.nats_credentials.is_set() && state.admin_seed_file().is_file() {
            self.nats_credentials.nkey_seed_file = Some(state.admin_seed_file());
        }
        if !is_up
            && stack::auth_mode(home)
            && self.clickhouse_user == audit_tables::DEFAULT_CLICKHOUSE_USER
            && self.clickhouse_password.is_empty()
            && let Some(secrets) = state.clickhouse_secrets()
        {
            self.clickhouse_user = crate::identity::CLICKHOUSE_READER_USER.to_owned();
            self.clickhouse_password = secrets.reader;
        }
        self
    }

    /// These endpoints with every node of the local cluster `up` started
    /// (`--nats-nodes 3`) when the NATS URL is its first node's alone, so
    /// meshctl fails over like the services do.
    pub(crate) fn with_local_cluster(mut self, home: &Home) -> anyhow::Result<Self> {
        let nodes = recorded_nodes(home);
        if nodes > 1
            && !self.nats_url.contains(',')
            && let Some(port) = loopback_port(&self.nats_url, 4222)
        {
            self.nats_url = cluster_url(port, nodes)?;
        }
        Ok(self)
    }

    /// A ClickHouse client without a default database.
    pub(crate) fn clickhouse(&self) -> clickhouse::Client {
        clickhouse::Client::default()
            .with_url(&self.clickhouse_url)
            .with_user(&self.clickhouse_user)
            .with_password(&self.clickhouse_password)
            .with_validation(false)
    }

    /// A ClickHouse client in the audit database.
    pub(crate) fn audit_db(&self) -> clickhouse::Client {
        self.clickhouse().with_database(&self.database)
    }

    /// Connect options with meshctl's NATS credentials.
    pub(crate) async fn nats_options(&self) -> anyhow::Result<async_nats::ConnectOptions> {
        Ok(self
            .nats_credentials
            .apply(async_nats::ConnectOptions::new().name("meshctl"))
            .await?)
    }

    /// A NATS connection with meshctl's credentials.
    pub(crate) async fn connect_nats(&self) -> anyhow::Result<async_nats::Client> {
        schemas::servers::connect(self.nats_options().await?, &self.nats_url)
            .await
            .with_context(|| format!("connecting to NATS at {}", self.nats_url))
    }
}

/// What answers at a NATS URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NatsState {
    /// A NATS server with JetStream.
    JetStream,
    /// A NATS server without JetStream.
    NoJetStream,
    /// A NATS server that refused meshctl's credentials (or their absence).
    Refused,
    /// Nothing (or nothing that speaks NATS).
    Unreachable,
}

/// Connects briefly with `endpoints`' credentials to see what answers.
pub(crate) async fn nats_state(endpoints: &Endpoints) -> NatsState {
    let Ok(options) = endpoints.nats_options().await else {
        return NatsState::Refused;
    };
    let connect = schemas::servers::connect(
        options
            .connection_timeout(Duration::from_secs(2))
            .max_reconnects(1),
        &endpoints.nats_url,
    );
    let client = match tokio::time::timeout(Duration::from_secs(3), connect).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) if e.kind() == async_nats::ConnectErrorKind::AuthorizationViolation => {
            return NatsState::Refused;
        }
        _ => return NatsState::Unreachable,
    };
    let js = async_nats::jetstream::new(client);
    let probe = tokio::time::timeout(Duration::from_secs(3), js.get_stream("MESHCTL_PROBE")).await;
    match probe {
        Ok(Ok(_)) => NatsState::JetStream,
        Ok(Err(e)) => match e.kind() {
            async_nats::jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                NatsState::JetStream
            }
            _ => NatsState::NoJetStream,
        },
        Err(_) => NatsState::NoJetStream,
    }
}

/// `SELECT version()`, or `None` when nothing answers.
pub(crate) async fn clickhouse_version(client: &clickhouse::Client) -> Option<String> {
    let query = client.query("SELECT version()").fetch_one::<String>();
    tokio::time::timeout(Duration::from_secs(3), query)
        .await
        .ok()?
        .ok()
}

/// The port of `url` when its host is this machine (`127.0.0.1`,
/// `localhost`, `::1`), else `None`.
pub(crate) fn loopback_port(url: &str, default_port: u16) -> Option<u16> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if !matches!(host, "127.0.0.1" | "localhost" | "::1") {
        return None;
    }
    match port {
        None | Some("") => Some(default_port),
        Some(p) => p.parse().ok(),
    }
}

/// Whether nothing listens on `127.0.0.1:<port>`.
pub(crate) fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

async fn wait_started(
    home: &Home,
    name: &str,
    child: &mut Child,
    timeout: Duration,
    mut ready: impl AsyncFnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready().await {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let _ = std::fs::remove_file(home.pid_file(name));
            bail!(
                "`{name}` exited ({status}) while starting; its log ({}) ends with:\n{}",
                home.log_file(name).display(),
                procs::log_tail(home, name, 2000)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "`{name}` did not become ready within {timeout:?}; see {}",
                home.log_file(name).display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The pid-file (and log) names of the local NATS nodes: the first keeps
/// the single server's name, so one node is what `up` always ran.
pub(crate) const NATS_NODES: [&str; 3] = ["nats-server", "nats-server-2", "nats-server-3"];

/// The cluster the local nodes form (`meshctl up --nats-nodes 3`).
const CLUSTER_NAME: &str = "agentmesh";

/// How far above the client port of the first node its route and
/// monitoring ports lie (4222: routes on 6222, monitoring on 8222).
const ROUTE_OFFSET: u16 = 2000;
const HTTP_OFFSET: u16 = 4000;

/// The file that records how many NATS nodes the last `up` here started.
fn nodes_file(home: &Home) -> std::path::PathBuf {
    home.run_dir().join("nats-nodes")
}

/// How many NATS nodes the last `meshctl up` here started (1 unless it
/// was given `--nats-nodes 3`).
pub(crate) fn recorded_nodes(home: &Home) -> usize {
    std::fs::read_to_string(nodes_file(home))
        .ok()
        .and_then(|n| n.trim().parse().ok())
        .filter(|n| (1..=NATS_NODES.len()).contains(n))
        .unwrap_or(1)
}

/// Records that the stack runs `nodes` NATS nodes.
pub(crate) fn record_nodes(home: &Home, nodes: usize) -> anyhow::Result<()> {
    std::fs::write(nodes_file(home), format!("{nodes}\n"))
        .with_context(|| format!("writing `{}`", nodes_file(home).display()))
}

/// The file that records the durability the last `up` here chose.
fn durability_file(home: &Home) -> std::path::PathBuf {
    home.run_dir().join("nats-durability")
}

/// The durability the last `meshctl up` here chose (`always` unless it was
/// given `--durability interval`): every rewrite of the node configs (an
/// agent added, a key rotated) keeps it.
pub(crate) fn recorded_durability(home: &Home) -> Durability {
    std::fs::read_to_string(durability_file(home))
        .ok()
        .and_then(|d| Durability::parse(&d))
        .unwrap_or_default()
}

/// Records that the stack's nodes run with `durability`.
pub(crate) fn record_durability(home: &Home, durability: Durability) -> anyhow::Result<()> {
    std::fs::write(durability_file(home), format!("{durability}\n"))
        .with_context(|| format!("writing `{}`", durability_file(home).display()))
}

/// The nats-server binary for the local nodes, refused when it cannot give
/// `durability`.
pub(crate) fn nats_binary_for(durability: Durability) -> anyhow::Result<std::path::PathBuf> {
    let found = procs::find_nats_server()?;
    if durability == Durability::Always && !found.version.can_sync_always() {
        bail!(
            "`{}` is nats-server {}, which cannot fsync each write (`sync_interval: always` needs {} or newer): {}, or pass `--durability interval` to run it without that guarantee",
            found.path.display(),
            found.version,
            broker_config::server::SYNC_INTERVAL_SINCE,
            broker_config::server::INSTALL_HINT
        );
    }
    Ok(found.path)
}

/// The monitoring endpoints (`http://host:port`) of the stack's NATS nodes:
/// `NATS_MONITORING_URL` (comma-separated) when set, else those of the
/// nodes `meshctl up` started here (the client port +4000), else none.
pub(crate) fn monitoring_urls(home: &Home, endpoints: &Endpoints) -> Vec<String> {
    if let Ok(urls) = std::env::var("NATS_MONITORING_URL")
        && !urls.trim().is_empty()
    {
        return urls.split(',').map(|u| u.trim().to_owned()).collect();
    }
    let first = endpoints.nats_url.split(',').next().unwrap_or_default();
    let Some(port) = loopback_port(first, 4222) else {
        return Vec::new();
    };
    if procs::read_pid(home, NATS_NODES[0]).is_none() {
        return Vec::new();
    }
    (0..recorded_nodes(home))
        .filter_map(|i| node_ports(port, i).ok())
        .map(|(_, _, http)| format!("http://127.0.0.1:{http}"))
        .collect()
}

/// Node `i` (0-based) of the local cluster whose first node listens on
/// `first_port`: (client, route, monitoring) ports.
pub(crate) fn node_ports(first_port: u16, i: usize) -> anyhow::Result<(u16, u16, u16)> {
    let i = u16::try_from(i).context("node index")?;
    let at = |offset: u16| {
        first_port
            .checked_add(offset)
            .and_then(|p| p.checked_add(i))
            .with_context(|| {
                format!("NATS port {first_port} leaves no room for the cluster's route and monitoring ports (+{ROUTE_OFFSET}, +{HTTP_OFFSET})")
            })
    };
    Ok((at(0)?, at(ROUTE_OFFSET)?, at(HTTP_OFFSET)?))
}

/// Node `i`'s server name: `nats-1`, `nats-2`, `nats-3`.
pub(crate) fn node_name(i: usize) -> String {
    format!("nats-{}", i + 1)
}

/// `nats://127.0.0.1:<port>` of every node, comma-separated: the URL list
/// the services and meshctl connect with.
pub(crate) fn cluster_url(first_port: u16, nodes: usize) -> anyhow::Result<String> {
    let urls = (0..nodes)
        .map(|i| node_ports(first_port, i).map(|(port, _, _)| format!("nats://127.0.0.1:{port}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(urls.join(","))
}

/// Node `i`'s store directory (its config file lives there too).
pub(crate) fn node_store(home: &Home, i: usize) -> std::path::PathBuf {
    match i {
        0 => home.root().join("nats"),
        _ => home.root().join(format!("nats-{}", i + 1)),
    }
}

/// Writes the config of each of `nodes` local nodes (with `principals`,
/// authorization) into its store directory; returns their paths. One node
/// has no cluster block: the single server `up` always started.
pub(crate) fn write_node_configs(
    home: &Home,
    first_port: u16,
    nodes: usize,
    principals: Option<Vec<broker_config::auth::Principal>>,
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut paths = Vec::new();
    let routes = (0..nodes)
        .map(|i| node_ports(first_port, i).map(|(_, route, _)| route))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for i in 0..nodes {
        let store = node_store(home, i);
        std::fs::create_dir_all(&store)
            .with_context(|| format!("creating `{}`", store.display()))?;
        let store = std::fs::canonicalize(&store)?;
        let (port, route_port, http_port) = node_ports(first_port, i)?;
        let cluster = (nodes > 1).then(|| broker_config::auth::ClusterNode {
            server_name: node_name(i),
            cluster_name: CLUSTER_NAME.to_owned(),
            route_port,
            routes: routes
                .iter()
                .filter(|r| **r != route_port)
                .map(|r| format!("nats-route://127.0.0.1:{r}"))
                .collect(),
        });
        let text = broker_config::auth::render_server_config(&broker_config::auth::ServerConfig {
            host: "127.0.0.1".into(),
            port,
            store_dir: store.clone(),
            principals: principals.clone(),
            cluster,
            http_port: Some(http_port),
            durability: recorded_durability(home),
            // The services `up` starts inherit the same environment.
            redacted_original: broker_config::RedactedOriginal::from_env()
                .map_err(anyhow::Error::msg)?,
        })?;
        let path = store.join("nats-server.conf");
        broker_config::credentials::write_private_file(&path, text.as_bytes())
            .with_context(|| format!("writing `{}`", path.display()))?;
        paths.push(path);
    }
    Ok(paths)
}

/// Starts the `nats-server` nodes of the local stack — one with JetStream
/// on `127.0.0.1:<first_port>` (flags, or `configs[0]`), or a cluster of
/// several from `configs` — and waits until each answers JetStream
/// requests (a cluster's only once a majority of its nodes runs, so all
/// are started before any is waited on).
pub(crate) async fn start_nats_nodes(
    home: &Home,
    endpoints: &Endpoints,
    first_port: u16,
    nodes: usize,
    configs: Option<&[std::path::PathBuf]>,
) -> anyhow::Result<Vec<(&'static str, Child)>> {
    if nodes == 1 {
        let child = start_nats(
            home,
            endpoints,
            first_port,
            configs.and_then(|c| c.first()).map(|c| c.as_path()),
        )
        .await?;
        return Ok(vec![(NATS_NODES[0], child)]);
    }
    let binary = nats_binary_for(recorded_durability(home))?;
    let Some(configs) = configs else {
        bail!("a NATS cluster is started from its node configs");
    };
    let mut children = Vec::new();
    for (i, config) in configs.iter().enumerate().take(nodes) {
        let (port, route, http) = node_ports(first_port, i)?;
        for p in [port, route, http] {
            if !port_free(p) {
                bail!(
                    "port {p} on 127.0.0.1, which NATS node `{}` needs, is taken: stop what holds it, or set NATS_URL to another first port",
                    node_name(i)
                );
            }
        }
        let args = vec!["-c".to_owned(), config.display().to_string()];
        children.push((
            NATS_NODES[i],
            procs::spawn(home, NATS_NODES[i], &binary, &args)?,
        ));
    }
    let mut waited = Ok(());
    for (i, (name, child)) in children.iter_mut().enumerate() {
        let node = Endpoints {
            nats_url: format!("nats://127.0.0.1:{}", node_ports(first_port, i)?.0),
            ..endpoints.clone()
        };
        waited = wait_started(home, name, child, Duration::from_secs(30), async || {
            nats_state(&node).await == NatsState::JetStream
        })
        .await;
        if waited.is_err() {
            break;
        }
    }
    if let Err(e) = waited {
        for (name, mut child) in children {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(home.pid_file(name));
        }
        return Err(e);
    }
    Ok(children)
}

/// Starts `nats-server -js` on `127.0.0.1:<port>`, store under
/// `.agentmesh/nats`, and waits until JetStream answers. With `config`
/// (the rendered authorization config, which names the same port and
/// store) the server reads that file instead of flags.
pub(crate) async fn start_nats(
    home: &Home,
    endpoints: &Endpoints,
    port: u16,
    config: Option<&Path>,
) -> anyhow::Result<Child> {
    let binary = nats_binary_for(recorded_durability(home))?;
    if !port_free(port) {
        bail!(
            "port {port} on 127.0.0.1 is taken by a program that is not a NATS server with JetStream: stop it, or set NATS_URL to your NATS server"
        );
    }
    let (_, _, http) = node_ports(port, 0)?;
    if config.is_some() && !port_free(http) {
        bail!(
            "port {http} on 127.0.0.1, which the NATS server's monitoring needs (NATS_URL's port +{HTTP_OFFSET}), is taken: stop what holds it, or set NATS_URL to another port"
        );
    }
    let store = home.root().join("nats");
    std::fs::create_dir_all(&store).with_context(|| format!("creating `{}`", store.display()))?;
    let args = match config {
        Some(config) => vec!["-c".to_owned(), config.display().to_string()],
        None => vec![
            "-js".to_owned(),
            "-a".to_owned(),
            "127.0.0.1".to_owned(),
            "-p".to_owned(),
            port.to_string(),
            "-sd".to_owned(),
            store.display().to_string(),
        ],
    };
    let mut child = procs::spawn(home, "nats-server", &binary, &args)?;
    wait_started(
        home,
        "nats-server",
        &mut child,
        Duration::from_secs(20),
        async || nats_state(endpoints).await == NatsState::JetStream,
    )
    .await?;
    Ok(child)
}

/// Writes a ClickHouse config under `.agentmesh/clickhouse/`, starts
/// `clickhouse-server` with it (HTTP on `127.0.0.1:<http_port>`) and waits
/// until it answers. Returns the child and the native-protocol port.
pub(crate) async fn start_clickhouse(
    home: &Home,
    endpoints: &Endpoints,
    http_port: u16,
    users: Option<&ClickHouseSecrets>,
) -> anyhow::Result<(Child, u16)> {
    start_clickhouse_as(
        home,
        endpoints,
        "clickhouse-server",
        "clickhouse",
        http_port,
        users,
        "",
    )
    .await
}

/// [`start_clickhouse`] as process `name` (its pid and log file) with its
/// files under `.agentmesh/<dir>`, answering at `endpoints.clickhouse_url`,
/// with `extra` (XML elements) added to its config: a replica's.
pub(crate) async fn start_clickhouse_as(
    home: &Home,
    endpoints: &Endpoints,
    name: &str,
    dir: &str,
    http_port: u16,
    users: Option<&ClickHouseSecrets>,
    extra: &str,
) -> anyhow::Result<(Child, u16)> {
    let binary = procs::find_server(
        "clickhouse-server",
        "CLICKHOUSE_SERVER_BIN",
        "clickhouse-server",
        "CLICKHOUSE_URL",
    )?;
    if !port_free(http_port) {
        bail!(
            "port {http_port} on 127.0.0.1 is taken by a program that is not a ClickHouse server answering at {}: stop it, or set CLICKHOUSE_URL to your ClickHouse server",
            endpoints.clickhouse_url
        );
    }
    // The native port clickhouse-client uses by default, when it is free
    // (`AGENTMESH_CLICKHOUSE_TCP_PORT` picks another).
    let wanted = std::env::var("AGENTMESH_CLICKHOUSE_TCP_PORT")
        .ok()
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(9000);
    let tcp_port = if name == "clickhouse-server" && http_port != wanted && port_free(wanted) {
        wanted
    } else {
        TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .context("finding a free port for ClickHouse's native protocol")?
    };
    let dir = home.root().join(dir);
    let config =
        write_clickhouse_config(&dir, http_port, tcp_port, users, &endpoints.database, extra)?;
    let args = vec![format!("--config-file={}", config.display())];
    let mut child = procs::spawn(home, name, &binary, &args)?;
    let client = endpoints.clickhouse();
    wait_started(
        home,
        name,
        &mut child,
        Duration::from_secs(60),
        async || clickhouse_version(&client).await.is_some(),
    )
    .await?;
    Ok((child, tcp_port))
}

/// Writes `config.xml` and `users.xml` into `dir` (the shared
/// `clickhouse-config` crate renders them; 127.0.0.1 only). Without `users`,
/// user `default` has no password; with them, `default` (the operator, DDL)
/// has a password and two more users exist, the sink's writer and a
/// read-only reader, each limited to `database`. `extra` (XML elements) is
/// added to the config: a replica's.
pub(crate) fn write_clickhouse_config(
    dir: &Path,
    http_port: u16,
    tcp_port: u16,
    users: Option<&ClickHouseSecrets>,
    database: &str,
    extra: &str,
) -> anyhow::Result<std::path::PathBuf> {
    let server = clickhouse_config::Server {
        dir,
        http_port,
        tcp_port,
        writer: "`meshctl up`",
        macros: &[],
        extra,
    };
    let passwords = users.map(|u| clickhouse_config::Passwords {
        admin: &u.admin,
        sink: &u.sink,
        reader: &u.reader,
        kept_in: ".agentmesh/auth/clickhouse.json",
    });
    clickhouse_config::write(&server, passwords.as_ref(), database)
        .with_context(|| format!("writing the ClickHouse config into `{}`", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_ports() {
        assert_eq!(loopback_port("nats://127.0.0.1:4222", 4222), Some(4222));
        assert_eq!(loopback_port("nats://localhost", 4222), Some(4222));
        assert_eq!(loopback_port("127.0.0.1:14222", 4222), Some(14222));
        assert_eq!(
            loopback_port("http://user:pw@127.0.0.1:18123/", 8123),
            Some(18123)
        );
        assert_eq!(loopback_port("http://[::1]:8124", 8123), Some(8124));
        assert_eq!(loopback_port("nats://nats.example:4222", 4222), None);
        assert_eq!(loopback_port("http://10.0.0.5:8123", 8123), None);
    }
}
