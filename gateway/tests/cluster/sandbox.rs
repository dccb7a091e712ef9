//! A real cluster on loopback: PostgreSQL, a Kafka-protocol broker (tansu), `palaver node` and
//! `palaver gateway` processes. Ports are picked free; readiness is awaited (the processes print
//! their address once serving, nodes report their live ring on `/ring`); teardown is explicit.
//! [`Sandbox::start_with_links`] puts a proxy on every path between processes (see
//! [`links::Links`]), so that a test can cut one process off while it keeps running.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use super::super::common::{Client, SECRET, token};
use super::super::{kafka::TestBroker, pg::TestPostgres};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[path = "links.rs"]
pub mod links;

pub struct Proc {
    pub child: Child,
    pub role: String,
    killed: bool,
    /// The HTTP address the process printed.
    pub http: String,
}

impl Proc {
    pub fn kill9(&mut self) {
        if self.killed {
            return;
        }
        if let Ok(Some(status)) = self.child.try_wait() {
            // It died before we killed it: say so, it is a bug.
            eprintln!(
                "palaver {} ({}) had exited by itself: {status}",
                self.role, self.http
            );
        }
        self.killed = true;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Sends SIGTERM (a graceful stop) and leaves the process running to finish.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-s", "TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits (up to `limit`) for the process to exit; its exit code.
    pub async fn exit_code(&mut self, limit: Duration) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.killed = true;
                return status.code();
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub async fn spawn(args: &[&str], env: Vec<(&str, String)>) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_palaver"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "PALAVER_LOG",
            std::env::var("PALAVER_TEST_LOG")
                .unwrap_or_else(|_| "error,rdkafka=off,librdkafka=off".into()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn palaver");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = tokio::time::timeout(Duration::from_secs(60), rx)
        .await
        .expect("process did not start in time")
        .unwrap_or_default();
    let http = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?} from palaver {args:?}"))
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    Proc {
        child,
        http,
        role: args.join(" "),
        killed: false,
    }
}

pub struct Sandbox {
    pub pg: TestPostgres,
    pub broker: TestBroker,
    pub db: String,
    data: tempfile::TempDir,
    ports: Vec<u16>,
    pub nodes: Vec<Option<Proc>>,
    pub gateways: Vec<Option<Proc>>,
    /// Added to every process's environment.
    extra: Vec<(&'static str, String)>,
    /// With [`Sandbox::start_with_links`]: the proxies every node and gateway dials its peers
    /// and PostgreSQL through. They live as long as the sandbox, across process restarts.
    pub links: Option<links::Links>,
}

impl Sandbox {
    /// Starts `nodes` of `slots` listed nodes, and `gateways` gateways.
    pub async fn start(slots: usize, nodes: usize, gateways: usize) -> Self {
        Self::start_with_env(slots, nodes, gateways, Vec::new()).await
    }

    /// [`Sandbox::start`], with `extra` in every process's environment.
    pub async fn start_with_env(
        slots: usize,
        nodes: usize,
        gateways: usize,
        extra: Vec<(&'static str, String)>,
    ) -> Self {
        Self::start_inner(slots, nodes, gateways, extra, false).await
    }

    /// [`Sandbox::start`], with every node and gateway reaching the other nodes and PostgreSQL
    /// through its own [`links::Link`]s, so that [`Sandbox::partition_node`] and
    /// [`Sandbox::partition_gateway`] can cut one off. Kafka and the clients' WebSocket
    /// connections are not proxied (see [`links::Links`]).
    pub async fn start_with_links(slots: usize, nodes: usize, gateways: usize) -> Self {
        Self::start_inner(slots, nodes, gateways, Vec::new(), true).await
    }

    async fn start_inner(
        slots: usize,
        nodes: usize,
        gateways: usize,
        extra: Vec<(&'static str, String)>,
        with_links: bool,
    ) -> Self {
        let pg = TestPostgres::start();
        let db = pg.database();
        let broker = TestBroker::start().await;
        let ports: Vec<u16> = (0..slots).map(|_| free_port()).collect();
        let links = if with_links {
            Some(links::Links::start(&ports, &db).await)
        } else {
            None
        };
        let mut s = Self {
            pg,
            broker,
            db,
            data: tempfile::tempdir().unwrap(),
            ports,
            nodes: (0..slots).map(|_| None).collect(),
            gateways: Vec::new(),
            extra,
            links,
        };
        for i in 0..nodes {
            s.start_node(i).await;
        }
        s.wait_ring(nodes).await;
        for _ in 0..gateways {
            s.start_gateway().await;
        }
        s
    }

    pub fn nodes_spec(&self) -> String {
        self.ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("n{i}@127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn common_env(&self) -> Vec<(&'static str, String)> {
        let mut env = self.extra.clone();
        env.extend([
            ("PALAVER_NODES", self.nodes_spec()),
            ("PALAVER_KAFKA_BROKERS", self.broker.brokers()),
            ("PALAVER_KAFKA_PARTITIONS", "16".into()),
            ("PALAVER_POSTGRES_URL", self.db.clone()),
            ("PALAVER_JWT_SECRET", SECRET.into()),
            ("PALAVER_HTTP_ADDR", "127.0.0.1:0".into()),
            ("PALAVER_DATA_DIR", self.data.path().display().to_string()),
        ]);
        env
    }

    /// `env` with `key` set to `value` (replacing what it had).
    fn set(env: &mut Vec<(&'static str, String)>, key: &'static str, value: String) {
        env.retain(|(k, _)| *k != key);
        env.push((key, value));
    }

    pub async fn start_node(&mut self, i: usize) {
        let mut env = self.common_env();
        if let Some(links) = &self.links {
            // Itself at its real address, every other node through the link i -> j.
            let nodes = self
                .ports
                .iter()
                .enumerate()
                .map(|(j, p)| match &links.nodes[i][j] {
                    Some(link) => format!("n{j}@{}", link.addr()),
                    None => format!("n{j}@127.0.0.1:{p}"),
                })
                .collect::<Vec<_>>()
                .join(",");
            Self::set(&mut env, "PALAVER_NODES", nodes);
            let pg = links.pg_url(&links.node_pg[i]);
            Self::set(&mut env, "PALAVER_POSTGRES_URL", pg);
        }
        env.push(("PALAVER_NODE_ID", format!("n{i}")));
        env.push((
            "PALAVER_CLUSTER_ADDR",
            format!("127.0.0.1:{}", self.ports[i]),
        ));
        self.nodes[i] = Some(spawn(&["node"], env).await);
    }

    pub async fn start_gateway(&mut self) -> usize {
        let j = self.gateways.len();
        let mut env = self.common_env();
        if let Some(links) = &mut self.links {
            links.add_gateway(j, &self.ports).await;
            let (to_nodes, pg) = links.gateways[j].as_ref().unwrap();
            let nodes = to_nodes
                .iter()
                .enumerate()
                .map(|(n, link)| format!("n{n}@{}", link.addr()))
                .collect::<Vec<_>>()
                .join(",");
            let pg = links.pg_url(pg);
            Self::set(&mut env, "PALAVER_NODES", nodes);
            Self::set(&mut env, "PALAVER_POSTGRES_URL", pg);
        }
        env.push(("PALAVER_GATEWAY_ID", format!("g{j}")));
        self.gateways.push(Some(spawn(&["gateway"], env).await));
        j
    }

    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].take() {
            p.kill9();
        }
    }

    pub fn kill_gateway(&mut self, j: usize) {
        if let Some(mut p) = self.gateways[j].take() {
            p.kill9();
        }
        // Entries are not reused: a new gateway gets a new entry and new links.
        if let Some(links) = &mut self.links {
            links.remove_gateway(j);
        }
    }

    /// Cuts node `i` off from every other node, every gateway and PostgreSQL (`cut`), or heals
    /// it. Needs [`Sandbox::start_with_links`].
    pub fn partition_node(&mut self, i: usize, cut: bool) {
        self.links
            .as_mut()
            .expect("a sandbox started with links")
            .partition_node(i, cut);
    }

    /// Cuts gateway entry `j` off from every node and PostgreSQL (`cut`), or heals it. Its
    /// clients' WebSocket connections stay up. Needs [`Sandbox::start_with_links`].
    pub fn partition_gateway(&mut self, j: usize, cut: bool) {
        self.links
            .as_mut()
            .expect("a sandbox started with links")
            .partition_gateway(j, cut);
    }

    /// Heals every partition (nothing without links).
    pub fn heal(&mut self) {
        if let Some(links) = &mut self.links {
            links.heal();
        }
    }

    /// Waits until every running node sees exactly `n` live nodes.
    pub async fn wait_ring(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut all = true;
            for p in self.nodes.iter().flatten() {
                let ring = get_json(&p.http, "/ring").await;
                if ring["nodes"].as_array().map(Vec::len) != Some(n) {
                    all = false;
                }
            }
            if all {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "ring never reached {n} nodes"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn gateway_ws(&self, j: usize) -> String {
        format!(
            "ws://{}/ws",
            self.gateways[j].as_ref().expect("gateway running").http
        )
    }

    pub async fn connect(&self, j: usize, user: &str) -> Client {
        Client::connect(&format!("{}?token={}", self.gateway_ws(j), token(user))).await
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Clients of the store and the broker first, then the services.
        for g in self.gateways.iter_mut().flatten() {
            g.kill9();
        }
        for n in self.nodes.iter_mut().flatten() {
            n.kill9();
        }
    }
}

/// GET over a raw socket, JSON body (`serde_json::Value::Null` when the process is gone).
pub async fn get_json(addr: &str, path: &str) -> serde_json::Value {
    serde_json::from_str(&get_text(addr, path).await).unwrap_or(serde_json::Value::Null)
}

/// GET over a raw socket, the body as text (empty when the process is gone or does not answer
/// within 5 s, as a paused one would not).
pub async fn get_text(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), get)
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}
