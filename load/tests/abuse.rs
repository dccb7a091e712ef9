//! `palaver-load abuse` against a real in-process Palaver, at smoke size: every phase runs and
//! reports, the server outlives every attack, and the probe loses nothing. It asserts no speed.
#![allow(clippy::unwrap_used)]

use palaver_gateway::Palaver;
use palaver_gateway::config::ConfigBuilder;
use palaver_load::abuse::{AbuseConfig, Target, abuse_against, render};
use std::time::Duration;

const SECRET: &str = "abuse-test-secret-0123456789";
const ADMIN: &str = "abuse-admin-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_phase_runs_and_the_probe_loses_nothing() {
    let cfg = AbuseConfig {
        palaver: "unused".into(),
        sources: 4,
        phase: Duration::from_secs(2),
        probe_pairs: 4,
        probe_rate: 10.0,
        silent: 20,
        slowloris: 20,
        storm: 300,
        group_members: 2_500,
        group_online: 100,
        flood_limit: Some(100_000),
        phases: palaver_load::abuse::PHASES.map(String::from).to_vec(),
        attackers_nice: 0,
    };
    let dir = tempfile::tempdir().unwrap();
    let env: std::collections::HashMap<_, _> =
        palaver_load::abuse::server_env(&cfg).into_iter().collect();
    let num = |k: &str| env[k].parse::<usize>().unwrap();
    let config = ConfigBuilder {
        http_addr: Some("127.0.0.1:0".into()),
        data_dir: Some(dir.path().to_owned()),
        jwt_secret: Some(SECRET.into()),
        admin_token: Some(ADMIN.into()),
        messages_per_second: Some(num("PALAVER_MESSAGES_PER_SECOND")),
        group_max_members: Some(num("PALAVER_GROUP_MAX_MEMBERS")),
        max_rooms_per_user: Some(num("PALAVER_MAX_ROOMS_PER_USER")),
        header_timeout_secs: Some(num("PALAVER_HEADER_TIMEOUT_SECS") as u64),
        ping_interval_secs: Some(num("PALAVER_PING_INTERVAL_SECS") as u64),
        ..Default::default()
    }
    .build()
    .unwrap();
    let server = Palaver::start(config).await.unwrap();
    let target = Target {
        port: server.addr().port(),
        pid: std::process::id(),
        secret: SECRET.into(),
        admin: ADMIN.into(),
    };
    let report = abuse_against(&cfg, &target).await.unwrap();
    let table = render(&report);
    println!("{table}");
    let names: Vec<&str> = report.phases.iter().map(|p| p.name).collect();
    assert_eq!(
        names,
        [
            "baseline",
            "never-read",
            "slowloris",
            "connect-drop",
            "big-group"
        ]
    );
    assert!(report.probe_sent > 0, "the probe sent nothing");
    assert_eq!(report.probe_lost, 0, "the probe lost messages:\n{table}");
    for p in &report.phases {
        assert!(p.probe.count > 0, "no probe sample in {}:\n{table}", p.name);
        assert!(p.peak_rss > 0, "no RSS read in {}", p.name);
    }
    let group = &report.phases[4].attack;
    assert!(
        group.starts_with("2500 members (100 online"),
        "big group not set up as asked: {group}"
    );
    let storm = &report.phases[3].attack;
    assert!(
        storm.contains("counted them gone"),
        "the storm's sessions were still counted: {storm}"
    );
    // The server still serves after all of it.
    let r = reqwest::get(format!("http://{}/healthz", server.addr()))
        .await
        .unwrap();
    assert!(r.status().is_success());
    server.shutdown().await.unwrap();
}
