//! palaver-load against a real in-process Palaver: the instrument must see every message.
#![allow(clippy::unwrap_used)]

use palaver_gateway::Palaver;
use palaver_gateway::config::ConfigBuilder;
use palaver_load::{Protocol, RoomKind, RunConfig, Workload, run, table};
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
        ..RunConfig::default()
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

/// The same Socket.IO workload the Node.js peer gets, against Palaver's Syarah dialect: direct
/// rooms by `joinRoom {otherUserId}`, groups created natively then joined by `chatHeaderId`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socketio_runs_against_palaver_see_every_message_once() {
    let (p, _dir) = server().await;
    for (workload, per_room) in [(Workload::Dm, 2u64), (Workload::Group, 5u64)] {
        let c = RunConfig {
            url: format!("ws://{}/socket.io/", p.addr()),
            protocol: Protocol::Socketio,
            prefix: format!("sio-{workload:?}-"),
            ..cfg(&p, workload, 10)
        };
        let r = run(c, false).await.unwrap();
        println!("{}", table(&r));
        assert!(r.sent > 20, "{r:?}");
        assert_eq!(r.acked, r.sent, "{r:?}");
        assert_eq!((r.lost, r.duplicated), (0, 0), "{r:?}");
        assert_eq!(r.delivered, r.acked * per_room, "{r:?}");
        assert!(r.errors.is_empty(), "{r:?}");
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
        ..RunConfig::default()
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

/// Drops `drop` of `clients` sessions abruptly, reconnects them at once, and checks that every
/// one came back and that, counting what they fetched with history, nothing was lost or doubled.
async fn reconnect_storm(rooms: RoomKind, clients: usize, drop: usize, prefix: &str) {
    let (p, _dir) = server().await;
    let c = RunConfig {
        workload: Workload::ReconnectStorm,
        storm_rooms: rooms,
        clients,
        drop,
        rate: 5.0,
        duration: Duration::from_secs(3),
        outage: Duration::from_millis(500),
        prefix: prefix.into(),
        ..cfg(&p, Workload::ReconnectStorm, clients)
    };
    let r = run(c, false).await.unwrap();
    println!("{}", table(&r));
    assert_eq!(r.dropped, drop, "{r:?}");
    assert_eq!(
        r.reconnected, drop,
        "every dropped client reconnects: {r:?}"
    );
    assert_eq!(r.reconnect_us.count, drop as u64, "{r:?}");
    assert_eq!(
        r.catchup_us.count, drop as u64,
        "every one caught up: {r:?}"
    );
    // A send made just before the drop may still be unanswered when the socket goes (a slow,
    // loaded CI machine); it is then not acknowledged, so no member is owed it. Nothing else.
    let unanswered = r.errors.get("unacked_at_drop").copied().unwrap_or(0);
    assert_eq!(r.errors.len(), usize::from(unanswered > 0), "{r:?}");
    assert!(r.sent > 0 && r.acked + unanswered == r.sent, "{r:?}");
    assert_eq!((r.lost, r.duplicated), (0, 0), "{r:?}");
    // Their peers kept talking during the outage: history had something to bring back.
    assert!(r.recovered > 0, "{r:?}");
    assert!(r.reconnects_per_second > 0.0, "{r:?}");
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storm_in_direct_rooms_loses_nothing() {
    reconnect_storm(RoomKind::Dm, 300, 120, "rs-dm-").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storm_in_groups_loses_nothing() {
    reconnect_storm(RoomKind::Group, 100, 40, "rs-group-").await;
}

/// The Node.js Socket.IO peer (load/peer-socketio) driven by the socketio protocol. Needs `node`
/// and `npm ci --prefix load/peer-socketio`; fails, saying so, when they are missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socketio_dm_against_the_node_peer_loses_nothing() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("peer-socketio");
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "`node` is not on PATH: the Socket.IO peer test needs Node.js"
    );
    for pkg in ["socket.io", "jsonwebtoken"] {
        assert!(
            dir.join("node_modules")
                .join(pkg)
                .join("package.json")
                .is_file(),
            "npm package `{pkg}` is missing: run `npm ci --prefix load/peer-socketio` first"
        );
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut peer = tokio::process::Command::new("node")
        .arg("server.js")
        .current_dir(&dir)
        .env("PORT", port.to_string())
        .env("HOST", "127.0.0.1")
        .env("JWT_SECRET", SECRET)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the peer did not listen"
        );
        assert!(peer.try_wait().unwrap().is_none(), "the peer exited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (workload, per_room) in [(Workload::Dm, 2u64), (Workload::Group, 5u64)] {
        let c = RunConfig {
            url: format!("ws://127.0.0.1:{port}/socket.io/"),
            secret: SECRET.into(),
            workload,
            protocol: Protocol::Socketio,
            clients: 20,
            group_size: 5,
            rate: 10.0,
            duration: Duration::from_secs(2),
            sources: 4,
            server_pid: peer.id(),
            prefix: format!("sio-{workload:?}-"),
            ..RunConfig::default()
        };
        let r = run(c, false).await.unwrap();
        println!("{}", table(&r));
        assert!(r.sent > 20, "{r:?}");
        assert_eq!(r.acked, r.sent, "{r:?}");
        assert_eq!((r.lost, r.duplicated), (0, 0), "{r:?}");
        assert_eq!(r.delivered, r.acked * per_room, "{r:?}");
        assert!(r.errors.is_empty(), "{r:?}");
        assert!(r.server_cpu_seconds.is_some(), "{r:?}");
    }
    peer.kill().await.unwrap();
}

#[tokio::test]
async fn socketio_refuses_the_reconnect_storm() {
    let c = RunConfig {
        workload: Workload::ReconnectStorm,
        protocol: Protocol::Socketio,
        ..RunConfig::default()
    };
    let e = run(c, false).await.unwrap_err();
    assert!(
        e.to_string().contains("dm, group, idle and connect-storm"),
        "{e}"
    );
}

/// Idle Socket.IO sessions against Palaver: every one is opened (a session in the hub) and held
/// for the run, then closed, and the report has the server's memory per session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socketio_idle_sessions_are_held_and_reported() {
    let (p, _dir) = server().await;
    let mut c = cfg(&p, Workload::Idle, 20);
    c.url = format!("ws://{}/socket.io/", p.addr());
    c.protocol = Protocol::Socketio;
    c.prefix = "sio-idle-".into();
    c.duration = Duration::from_secs(2);
    let app = p.app().clone();
    let most = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = most.clone();
    let watch = tokio::spawn(async move {
        loop {
            seen.fetch_max(app.hub.len(), std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let r = run(c, false).await.unwrap();
    watch.abort();
    println!("{}", table(&r));
    assert_eq!(r.clients, 20);
    assert_eq!(r.connect_us.count, 20);
    assert!(r.rss_per_session_bytes.is_some(), "{r:?}");
    assert_eq!(most.load(std::sync::atomic::Ordering::Relaxed), 20);
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
