//! palaver-load against a real in-process Palaver: the instrument must see every message.
#![allow(clippy::unwrap_used)]

use palaver_gateway::Palaver;
use palaver_gateway::config::ConfigBuilder;
use palaver_load::{RunConfig, Workload, run, table};
use std::time::Duration;

const SECRET: &str = "load-test-secret-0123456789";

async fn server() -> (Palaver, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder {
        http_addr: Some("127.0.0.1:0".into()),
        data_dir: Some(dir.path().to_owned()),
        jwt_secret: Some(SECRET.into()),
        ..Default::default()
    }
    .build()
    .unwrap();
    (Palaver::start(config).await.unwrap(), dir)
}

fn cfg(p: &Palaver, workload: Workload, clients: usize) -> RunConfig {
    RunConfig {
        url: format!("ws://{}/ws", p.addr()),
        secret: SECRET.into(),
        workload,
        clients,
        group_size: 5,
        rate: 20.0,
        duration: Duration::from_secs(2),
        sources: 4,
        server_pid: Some(std::process::id()),
        prefix: format!("{workload:?}-"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dm_and_group_runs_see_every_message_once() {
    let (p, _dir) = server().await;
    for (workload, per_room) in [(Workload::Dm, 2u64), (Workload::Group, 5u64)] {
        let r = run(cfg(&p, workload, 10), false).await.unwrap();
        println!("{}", table(&r));
        assert!(r.sent > 20, "{r:?}");
        assert_eq!(r.acked, r.sent, "{r:?}");
        assert_eq!((r.lost, r.duplicated), (0, 0), "{r:?}");
        // Every member (sender included) gets every message of its room once.
        assert_eq!(r.delivered, r.acked * per_room, "{r:?}");
        assert_eq!(r.ack_us.count, r.acked);
        assert!(r.ack_us.p50 > 0 && r.deliver_us.count > 0);
        assert!(r.server_rss_bytes.unwrap() > 0);
    }
    p.shutdown().await.unwrap();
}

#[tokio::test]
async fn only_loopback_is_a_target() {
    let mut c = RunConfig {
        url: "ws://10.1.2.3:8080/ws".into(),
        secret: SECRET.into(),
        workload: Workload::Dm,
        clients: 2,
        group_size: 2,
        rate: 1.0,
        duration: Duration::from_secs(1),
        sources: 1,
        server_pid: None,
        prefix: "x".into(),
    };
    let e = run(c.clone(), false).await.unwrap_err();
    assert!(e.to_string().contains("loopback"), "{e}");
    c.url = "ws://127.0.0.1:8080/ws".into();
    c.clients = 1;
    assert!(
        run(c, false).await.is_err(),
        "one client cannot make a room"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_connect_storm_report_sessions() {
    let (p, _dir) = server().await;
    let mut c = cfg(&p, Workload::ConnectStorm, 100);
    let r = run(c.clone(), false).await.unwrap();
    println!("{}", table(&r));
    assert_eq!(r.connect_us.count, 100);
    assert!(r.connects_per_second > 0.0);
    c.workload = Workload::Idle;
    c.prefix = "idle-".into();
    c.duration = Duration::from_secs(1);
    let r = run(c, false).await.unwrap();
    println!("{}", table(&r));
    assert_eq!(r.clients, 100);
    assert!(r.rss_per_session_bytes.is_some() && r.idle_cpu_us_per_session_second.is_some());
    // The clients closed their sessions; the server sees them go.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !p.app().hub.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} sessions left open",
            p.app().hub.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.shutdown().await.unwrap();
}
