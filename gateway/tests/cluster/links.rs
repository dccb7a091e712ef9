//! Network partitions without root: a test-side TCP proxy ("link") per (source process,
//! destination) pair. A process dials the link's loopback port instead of its peer, and the test
//! cuts the link by no longer forwarding anything through it.
//!
//! A link that is down stops reading from both sides of every connection it carries: the bytes
//! stay in the kernel's socket buffers (and the senders block once those fill), so both peers see
//! silence, as if the packets were dropped; nobody sees a reset or a close. A connection accepted
//! while the link is down is not connected upstream until the link is up again. Bringing the link
//! up resumes forwarding where it stopped. If the upstream refuses the connection (its process is
//! down), the accepted connection is closed, as a dead peer's port would. A connection ends (and
//! its task with it) when either side closes it or fails; dropping the link ends every task.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Where a link forwards to.
#[derive(Clone, Debug)]
pub enum Upstream {
    /// `host:port`.
    Tcp(String),
    /// A Unix socket (PostgreSQL in the tests listens on one only).
    Unix(PathBuf),
}

/// One proxied path from one process to one destination, with an up/down switch.
pub struct Link {
    /// The loopback port the source process dials.
    pub port: u16,
    up: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl Link {
    /// A link to `upstream` listening on a free loopback port; up iff `up`.
    pub async fn start(upstream: Upstream, up: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = watch::channel(up);
        let accept = tokio::spawn(accept_loop(listener, upstream, rx));
        Self {
            port,
            up: tx,
            accept,
        }
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Forwards (`true`) or drops (`false`) the traffic from now on.
    pub fn set_up(&self, up: bool) {
        self.up.send_if_modified(|v| std::mem::replace(v, up) != up);
    }

    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Ends the accept loop, and with its `JoinSet` every connection task.
        self.accept.abort();
    }
}

/// Waits until the link is up; `false` if the link is gone.
async fn until_up(rx: &mut watch::Receiver<bool>) -> bool {
    rx.wait_for(|up| *up).await.is_ok()
}

async fn accept_loop(listener: TcpListener, upstream: Upstream, rx: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else {
                    // Out of descriptors or similar: try again shortly.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = client.set_nodelay(true);
                conns.spawn(connection(client, upstream.clone(), rx.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// One accepted connection: connected upstream once the link is up, then forwarded both ways.
async fn connection(client: TcpStream, upstream: Upstream, mut rx: watch::Receiver<bool>) {
    if !until_up(&mut rx).await {
        return;
    }
    match upstream {
        Upstream::Tcp(addr) => {
            let Ok(Ok(server)) =
                tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&addr)).await
            else {
                return; // Dropping `client` closes it.
            };
            let _ = server.set_nodelay(true);
            pipe(client, server, rx).await;
        }
        Upstream::Unix(path) => {
            let Ok(Ok(server)) =
                tokio::time::timeout(Duration::from_secs(2), UnixStream::connect(&path)).await
            else {
                return;
            };
            pipe(client, server, rx).await;
        }
    }
}

/// Forwards both directions until both are finished; either one failing ends the connection.
async fn pipe<S>(client: TcpStream, server: S, rx: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (cr, cw) = client.into_split();
    let (sr, sw) = tokio::io::split(server);
    let there = forward(cr, sw, rx.clone());
    let back = forward(sr, cw, rx);
    tokio::pin!(there, back);
    // A clean end of one direction (EOF, passed on as a half-close) waits for the other; an
    // error or a link that is gone drops both halves at once.
    let (mut there_done, mut back_done) = (false, false);
    while !(there_done && back_done) {
        tokio::select! {
            ok = &mut there, if !there_done => {
                if !ok {
                    return;
                }
                there_done = true;
            }
            ok = &mut back, if !back_done => {
                if !ok {
                    return;
                }
                back_done = true;
            }
        }
    }
}

/// Copies `from` to `to`, reading only while the link is up. `true` on a clean EOF (after
/// shutting `to`'s write side), `false` on an error or when the link is gone.
async fn forward<R, W>(mut from: R, mut to: W, mut rx: watch::Receiver<bool>) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !until_up(&mut rx).await {
            return false;
        }
        let read = tokio::select! {
            r = from.read(&mut buf) => Some(r),
            // Went down: stop reading (reads are cancel-safe, nothing is lost).
            gone = async { rx.wait_for(|up| !*up).await.is_err() } => {
                if gone {
                    return false;
                }
                None
            }
        };
        let n = match read {
            None => continue,
            Some(Ok(0)) => {
                let _ = to.shutdown().await;
                return true;
            }
            Some(Ok(n)) => n,
            Some(Err(_)) => return false,
        };
        // Read just as the link went down: hold it until the link is up again.
        if !until_up(&mut rx).await {
            return false;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return false;
        }
    }
}

/// The links of a [`super::sandbox::Sandbox`] started with links: every node and gateway dials
/// its peers and PostgreSQL through its own links, so that one process can be cut off from all
/// the others while it keeps running.
///
/// Not proxied: Kafka (a Kafka client connects to the broker address the broker advertises in its
/// metadata, so a proxy in front of the bootstrap address would be bypassed after the first
/// request), and the clients' WebSocket connections to the gateways (the test's own clients
/// connect directly). A partition therefore cuts a process off from its peers and the store, not
/// from the broker nor from its clients.
pub struct Links {
    /// `nodes[i][j]`: node i -> node j (`None` for i == j: a node dials itself directly).
    pub nodes: Vec<Vec<Option<Link>>>,
    /// Node i -> PostgreSQL.
    pub node_pg: Vec<Link>,
    /// Per entry of `Sandbox::gateways`: (its links to every node, its link to PostgreSQL);
    /// `None` once that gateway is gone.
    pub gateways: Vec<Option<(Vec<Link>, Link)>>,
    /// Where the PostgreSQL links forward to.
    pub pg: Upstream,
    /// The PostgreSQL connection string with host and port left out (user, database, options).
    pg_rest: String,
    partitioned_nodes: Vec<bool>,
    partitioned_gateways: Vec<bool>,
}

impl Links {
    /// Links between `node_ports.len()` nodes (their real cluster ports) and to the PostgreSQL
    /// of `pg_url` (a `key=value` connection string).
    pub async fn start(node_ports: &[u16], pg_url: &str) -> Self {
        let (pg, pg_rest) = split_pg_url(pg_url);
        let n = node_ports.len();
        let mut nodes = Vec::new();
        for i in 0..n {
            let mut row = Vec::new();
            for (j, port) in node_ports.iter().enumerate() {
                row.push(if i == j {
                    None
                } else {
                    Some(Link::start(Upstream::Tcp(format!("127.0.0.1:{port}")), true).await)
                });
            }
            nodes.push(row);
        }
        let mut node_pg = Vec::new();
        for _ in 0..n {
            node_pg.push(Link::start(pg.clone(), true).await);
        }
        Self {
            nodes,
            node_pg,
            gateways: Vec::new(),
            pg,
            pg_rest,
            partitioned_nodes: vec![false; n],
            partitioned_gateways: Vec::new(),
        }
    }

    /// The connection string for PostgreSQL through `link`.
    pub fn pg_url(&self, link: &Link) -> String {
        format!("host=127.0.0.1 port={} {}", link.port, self.pg_rest)
    }

    /// Creates the links of gateway entry `g` (reached at `node_ports`), down toward partitioned
    /// nodes.
    pub async fn add_gateway(&mut self, g: usize, node_ports: &[u16]) {
        if self.gateways.len() <= g {
            self.gateways.resize_with(g + 1, || None);
            self.partitioned_gateways.resize(g + 1, false);
        }
        self.partitioned_gateways[g] = false;
        let mut to_nodes = Vec::new();
        for (j, port) in node_ports.iter().enumerate() {
            let up = !self.partitioned_nodes[j];
            to_nodes.push(Link::start(Upstream::Tcp(format!("127.0.0.1:{port}")), up).await);
        }
        let pg = Link::start(self.pg.clone(), true).await;
        self.gateways[g] = Some((to_nodes, pg));
    }

    /// Drops the links of gateway entry `g` (it is gone for good).
    pub fn remove_gateway(&mut self, g: usize) {
        if let Some(slot) = self.gateways.get_mut(g) {
            *slot = None;
            self.partitioned_gateways[g] = false;
        }
    }

    /// Cuts node `i` off (`true`) or heals it (`false`): every link from or to it.
    pub fn partition_node(&mut self, i: usize, cut: bool) {
        self.partitioned_nodes[i] = cut;
        self.apply();
    }

    /// Cuts gateway entry `g` off (`true`) or heals it (`false`): its links to every node and to
    /// PostgreSQL.
    pub fn partition_gateway(&mut self, g: usize, cut: bool) {
        if g < self.partitioned_gateways.len() {
            self.partitioned_gateways[g] = cut;
            self.apply();
        }
    }

    /// Heals every partition.
    pub fn heal(&mut self) {
        self.partitioned_nodes.iter_mut().for_each(|p| *p = false);
        self.partitioned_gateways
            .iter_mut()
            .for_each(|p| *p = false);
        self.apply();
    }

    /// Whether any link is down.
    pub fn any_down(&self) -> bool {
        self.partitioned_nodes.iter().any(|p| *p) || self.partitioned_gateways.iter().any(|p| *p)
    }

    /// Sets every link from the partition state: a link is up unless its source or its
    /// destination is partitioned.
    fn apply(&self) {
        let pn = &self.partitioned_nodes;
        for (i, row) in self.nodes.iter().enumerate() {
            for (j, link) in row.iter().enumerate() {
                if let Some(link) = link {
                    link.set_up(!pn[i] && !pn[j]);
                }
            }
        }
        for (i, link) in self.node_pg.iter().enumerate() {
            link.set_up(!pn[i]);
        }
        for (g, links) in self.gateways.iter().enumerate() {
            if let Some((to_nodes, pg)) = links {
                let cut = self.partitioned_gateways[g];
                for (j, link) in to_nodes.iter().enumerate() {
                    link.set_up(!cut && !pn[j]);
                }
                pg.set_up(!cut);
            }
        }
    }
}

/// Splits a `key=value` PostgreSQL connection string into where to connect (a Unix socket in
/// the `host` directory, or a TCP `host:port`) and the rest (user, database, options) as given.
fn split_pg_url(url: &str) -> (Upstream, String) {
    let mut host = None;
    let mut port = None;
    let mut rest = Vec::new();
    for part in url.split_whitespace() {
        if let Some(h) = part.strip_prefix("host=") {
            host = Some(h.to_owned());
        } else if let Some(p) = part.strip_prefix("port=") {
            port = Some(p.to_owned());
        } else {
            rest.push(part);
        }
    }
    let host = host.expect("the PostgreSQL connection string has a host");
    let port = port.unwrap_or_else(|| "5432".into());
    let upstream = if host.starts_with('/') {
        Upstream::Unix(PathBuf::from(format!("{host}/.s.PGSQL.{port}")))
    } else {
        Upstream::Tcp(format!("{host}:{port}"))
    };
    (upstream, rest.join(" "))
}
