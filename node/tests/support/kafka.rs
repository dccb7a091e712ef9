//! A real Kafka-protocol broker for tests: `tansu` with in-memory storage on a loopback port.
//! `./.ci/run` installs it (`cargo install tansu --features dynostore`).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TestBroker {
    child: Option<Child>,
    pub port: u16,
    bin: PathBuf,
}

fn bin() -> PathBuf {
    if let Ok(p) = std::env::var("PALAVER_TEST_TANSU") {
        return PathBuf::from(p);
    }
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"));
    let p = home.join("bin/tansu");
    assert!(
        p.exists(),
        "tansu not found at {}; ./.ci/run installs it (cargo install tansu --features dynostore)",
        p.display()
    );
    p
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl TestBroker {
    pub async fn start() -> Self {
        let mut b = Self {
            child: None,
            port: free_port(),
            bin: bin(),
        };
        b.spawn().await;
        b
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(&self.bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the broker (losing its in-memory topics).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills it, keeps it down for `outage` (a real broker takes seconds to come back; clients
    /// see the connection fail in the meantime), and starts it again on the same port.
    /// The broker's process id while it runs (to pause it with SIGSTOP).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts it again after [`TestBroker::kill`], on the same port.
    pub async fn start_again(&mut self) {
        self.spawn().await;
    }

    pub async fn restart(&mut self, outage: Duration) {
        self.kill();
        tokio::time::sleep(outage).await;
        self.spawn().await;
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.kill();
    }
}
