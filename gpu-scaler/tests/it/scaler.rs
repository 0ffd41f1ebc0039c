//! The scaler against a real nats-server with a declared inventory: grants on
//! rising backlog, releases after the cooldown, no double lease between two
//! racing scalers, expiry and reclaim after a crash, unhealthy GPUs, the
//! worker helper, the overview `meshctl gpus` prints, and the binary.

use crate::common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use common::*;
use futures::StreamExt;
use gpu_pools::{Lease, LeaseStore, overview};
use gpu_scaler::events::{TYPE_GRANTED, TYPE_RELEASED};
use gpu_scaler::{cuda_visible_devices, watch_pool};
use testkit::{WAIT, eventually};

const LONG: Duration = Duration::from_secs(60);

#[tokio::test]
async fn rising_backlog_is_leased_in_one_round_and_each_grant_is_an_event() -> anyhow::Result<()> {
    let mesh = mesh().await?;
    let consumer = work_consumer(&mesh.js, "coder").await?;
    let cfg = config(
        4,
        Duration::from_millis(250),
        Duration::from_secs(15),
        &[("coder", pool("coder", 10, 0, 4, LONG))],
    );
    let (mut scaler, _inv) = scaler(&mesh, &cfg, "scaler-a").await?;

    let r = scaler.round().await?;
    assert_eq!(r.granted, 0, "no backlog, no lease");
    assert!(leases(&mesh.js).await?.is_empty());

    publish_work(&mesh.js, "coder", 25).await?;
    // One round after the backlog rose: ceil(25 / 10) = 3 leases.
    let r = scaler.round().await?;
    assert_eq!(r.granted, 3);
    let held = leases_of(&mesh.js, "coder").await?;
    let gpus: Vec<&str> = held.iter().map(|l| l.gpu.as_str()).collect();
    assert_eq!(gpus, [gpu_uuid(0), gpu_uuid(1), gpu_uuid(2)]);
    for lease in &held {
        assert_eq!(lease.holder, "scaler-a");
        let ttl = (lease.expires_at - lease.granted_at).num_milliseconds();
        assert_eq!(ttl, 15_000);
    }

    // Messages delivered but not acked still count (ack pending).
    let mut batch = consumer.fetch().max_messages(25).messages().await?;
    let mut delivered = Vec::new();
    while let Some(m) = batch.next().await {
        delivered.push(m.map_err(|e| anyhow::anyhow!(e))?);
    }
    assert_eq!(delivered.len(), 25);
    publish_work(&mesh.js, "coder", 10).await?;
    let r = scaler.round().await?;
    assert_eq!(r.granted, 1, "25 ack pending + 10 pending = 4 GPUs");

    let events = lease_events(&mesh.js).await?;
    assert_eq!(events.len(), 4);
    for (subject, ty, source, data) in &events {
        assert_eq!(subject, "mesh.gpu.lease.coder");
        assert_eq!(ty, TYPE_GRANTED);
        assert_eq!(source, "/gpu-scaler/scaler-a");
        assert_eq!(data.pool, "coder");
        assert_eq!(data.holder, "scaler-a");
        assert!(data.expires_at.ends_with('Z'));
    }
    let granted: Vec<&str> = events.iter().map(|e| e.3.gpu.as_str()).collect();
    assert_eq!(
        granted,
        [gpu_uuid(0), gpu_uuid(1), gpu_uuid(2), gpu_uuid(3)]
    );
    Ok(())
}

#[tokio::test]
async fn running_scaler_grants_within_an_interval_and_releases_only_after_the_cooldown()
-> anyhow::Result<()> {
    let mesh = mesh().await?;
    let consumer = work_consumer(&mesh.js, "coder").await?;
    let interval = Duration::from_millis(100);
    let cooldown = Duration::from_secs(2);
    let cfg = config(
        4,
        interval,
        Duration::from_secs(5),
        &[("coder", pool("coder", 10, 0, 4, cooldown))],
    );
    let running = spawn_scaler(&mesh, &cfg, "scaler-a").await?;

    publish_work(&mesh.js, "coder", 20).await?;
    let published = Instant::now();
    eventually(WAIT, "2 leases", || async {
        (leases_of(&mesh.js, "coder").await.ok()?.len() == 2).then_some(())
    })
    .await?;
    println!(
        "leases granted {:?} after the backlog rose",
        published.elapsed()
    );

    assert_eq!(drain(&consumer).await?, 20);
    let drained = Instant::now();
    eventually(WAIT, "leases released", || async {
        leases_of(&mesh.js, "coder")
            .await
            .ok()?
            .is_empty()
            .then_some(())
    })
    .await?;
    let kept_for = drained.elapsed();
    println!("leases released {kept_for:?} after the backlog drained (cooldown {cooldown:?})");
    // The cooldown counts from the last round that saw the backlog, a little
    // before the drain finished; half of it is a bound no scheduling delay
    // on a busy machine breaks, and a scaler ignoring the cooldown would
    // release at the next round, 100 ms later.
    assert!(
        kept_for >= cooldown / 2,
        "released after {kept_for:?}, before the cooldown"
    );

    // The events of a round are published after its leases are written.
    let events = eventually(WAIT, "the two release events", || async {
        let events = lease_events(&mesh.js).await.ok()?;
        let released = events.iter().filter(|e| e.1 == TYPE_RELEASED).count();
        (released >= 2).then_some(events)
    })
    .await?;
    let released: Vec<_> = events.iter().filter(|e| e.1 == TYPE_RELEASED).collect();
    assert_eq!(released.len(), 2);
    assert!(
        released
            .iter()
            .all(|e| e.3.reason.as_deref() == Some("demand"))
    );
    running.stop().await;
    Ok(())
}

/// Every write to a lease key, in revision order, must be a grant on a free
/// key, a renewal by the same holder of the same lease, or a release.
fn assert_no_double_lease(history: &[kv::Entry]) -> anyhow::Result<()> {
    let mut current: BTreeMap<String, Option<Lease>> = BTreeMap::new();
    let mut last_revision = 0;
    for entry in history {
        assert!(entry.revision > last_revision, "history out of order");
        last_revision = entry.revision;
        let slot = current.entry(entry.key.clone()).or_default();
        match entry.operation {
            kv::Operation::Put => {
                let lease: Lease = serde_json::from_slice(&entry.value)?;
                if let Some(previous) = slot {
                    assert!(
                        previous.holder == lease.holder
                            && previous.pool == lease.pool
                            && previous.granted_at == lease.granted_at,
                        "GPU `{}` leased over a live lease: {previous:?} then {lease:?}",
                        entry.key
                    );
                }
                *slot = Some(lease);
            }
            kv::Operation::Delete | kv::Operation::Purge => *slot = None,
        }
    }
    Ok(())
}

#[tokio::test]
async fn two_racing_scalers_never_lease_a_gpu_twice() -> anyhow::Result<()> {
    let mesh = mesh().await?;
    let coder = work_consumer(&mesh.js, "coder").await?;
    let reviewer = work_consumer(&mesh.js, "reviewer").await?;
    let cfg = config(
        3,
        Duration::from_millis(50),
        Duration::from_secs(5),
        &[
            ("coder", pool("coder", 10, 0, 3, Duration::ZERO)),
            ("reviewer", pool("reviewer", 10, 0, 3, Duration::ZERO)),
        ],
    );
    // Record every write to the bucket from the first revision on.
    let store = LeaseStore::open(&mesh.js).await?;
    let mut watch = store.kv().watch_all_from_revision(1).await?;
    let history = Arc::new(Mutex::new(Vec::new()));
    let recorder = {
        let history = history.clone();
        tokio::spawn(async move {
            while let Some(Ok(entry)) = watch.next().await {
                history.lock().unwrap().push(entry);
            }
        })
    };

    let (mut a, _) = scaler(&mesh, &cfg, "scaler-a").await?;
    let (mut b, _) = scaler(&mesh, &cfg, "scaler-b").await?;
    let mut conflicts = 0;
    // Demand swings between the pools; both scalers decide on the same
    // state at the same moment, round after round.
    for step in 0..30 {
        match step % 6 {
            0 => publish_work(&mesh.js, "coder", 30).await?,
            2 => publish_work(&mesh.js, "reviewer", 30).await?,
            3 => {
                drain(&coder).await?;
            }
            5 => {
                drain(&reviewer).await?;
            }
            _ => {}
        }
        let (ra, rb) = tokio::join!(a.round(), b.round());
        let (ra, rb) = (ra?, rb?);
        conflicts += ra.conflicts + rb.conflicts;
        let live = leases(&mesh.js).await?;
        assert!(live.len() <= 3, "more leases than GPUs: {live:?}");
    }
    println!("{conflicts} conditional writes lost a race and were retried on fresh state");

    let last = store.kv().stream.get_info().await?.state.last_sequence;
    eventually(WAIT, "the recorder to catch up", || async {
        (history.lock().unwrap().last().map(|e| e.revision) == Some(last)).then_some(())
    })
    .await?;
    recorder.abort();
    let history = history.lock().unwrap().clone();
    assert!(
        history.len() > 6,
        "the race did not exercise the bucket: {} writes",
        history.len()
    );
    assert_no_double_lease(&history)?;

    // The events agree: per GPU, grants and releases alternate.
    let mut open: BTreeMap<String, bool> = BTreeMap::new();
    let mut events = lease_events(&mesh.js).await?;
    // Two publishers: order by the KV decision each event reports (a grant
    // before its own release), which per GPU is the granted_at order.
    events.sort_by(|x, y| {
        (&x.3.gpu, &x.3.granted_at, x.1 == TYPE_RELEASED).cmp(&(
            &y.3.gpu,
            &y.3.granted_at,
            y.1 == TYPE_RELEASED,
        ))
    });
    for (_, ty, _, data) in &events {
        let held = open.entry(data.gpu.clone()).or_default();
        if ty == TYPE_GRANTED {
            assert!(!*held, "GPU `{}` granted twice without a release", data.gpu);
            *held = true;
        } else {
            assert!(*held, "GPU `{}` released without a grant", data.gpu);
            *held = false;
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_killed_scalers_leases_expire_and_are_reclaimed() -> anyhow::Result<()> {
    let mesh = mesh().await?;
    let _consumer = work_consumer(&mesh.js, "coder").await?;
    let ttl = Duration::from_millis(1500);
    let cfg = config(
        2,
        Duration::from_millis(100),
        ttl,
        &[("coder", pool("coder", 10, 0, 2, LONG))],
    );
    let a = spawn_scaler(&mesh, &cfg, "scaler-a").await?;
    publish_work(&mesh.js, "coder", 20).await?;
    let before = eventually(WAIT, "2 leases held by scaler-a", || async {
        let held = leases_of(&mesh.js, "coder").await.ok()?;
        (held.len() == 2 && held.iter().all(|l| l.holder == "scaler-a")).then_some(held)
    })
    .await?;
    // Renewed while alive: wait until every lease has been extended once.
    eventually(WAIT, "scaler-a to renew its leases", || async {
        let held = leases_of(&mesh.js, "coder").await.ok()?;
        let renewed = held
            .iter()
            .zip(&before)
            .all(|(now, then)| now.expires_at > then.expires_at);
        (held.len() == 2 && renewed).then_some(())
    })
    .await?;

    a.kill();
    let killed = Instant::now();
    let b = spawn_scaler(&mesh, &cfg, "scaler-b").await?;
    let reclaimed = eventually(WAIT, "scaler-b to reclaim both GPUs", || async {
        let held = leases_of(&mesh.js, "coder").await.ok()?;
        (held.len() == 2 && held.iter().all(|l| l.holder == "scaler-b")).then_some(held)
    })
    .await?;
    println!(
        "reclaimed {:?} after the kill (lease_ttl {ttl:?})",
        killed.elapsed()
    );
    // The pool keeps its GPUs: the reclaimed leases are on the same ones.
    let gpus = |ls: &[Lease]| ls.iter().map(|l| l.gpu.clone()).collect::<Vec<_>>();
    assert_eq!(gpus(&reclaimed), gpus(&before));

    // The lease events go out through the scaler's outbox after the leases
    // are written: wait until scaler-b's two grants are in the stream.
    let events = eventually(WAIT, "scaler-b's two grant events", || async {
        let events = lease_events(&mesh.js).await.ok()?;
        let granted = events
            .iter()
            .filter(|e| e.1 == TYPE_GRANTED && e.3.holder == "scaler-b")
            .count();
        (granted >= 2).then_some(events)
    })
    .await?;
    let expired: Vec<_> = events
        .iter()
        .filter(|e| e.1 == TYPE_RELEASED && e.3.reason.as_deref() == Some("expired"))
        .collect();
    assert_eq!(expired.len(), 2);
    assert!(
        expired
            .iter()
            .all(|e| e.3.holder == "scaler-a" && e.2 == "/gpu-scaler/scaler-b")
    );
    let regranted = events
        .iter()
        .filter(|e| e.1 == TYPE_GRANTED && e.3.holder == "scaler-b")
        .count();
    assert_eq!(regranted, 2);
    b.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_unhealthy_gpu_is_released_and_not_leased_until_healthy() -> anyhow::Result<()> {
    let mesh = mesh().await?;
    let _consumer = work_consumer(&mesh.js, "coder").await?;
    let cfg = config(
        3,
        Duration::from_millis(250),
        Duration::from_secs(15),
        &[("coder", pool("coder", 10, 0, 3, LONG))],
    );
    let (mut scaler, inventory) = scaler(&mesh, &cfg, "scaler-a").await?;
    publish_work(&mesh.js, "coder", 20).await?;
    scaler.round().await?;
    let held = |m: &BTreeMap<String, Lease>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(held(&leases(&mesh.js).await?), [gpu_uuid(0), gpu_uuid(1)]);

    assert!(inventory.set_healthy(&gpu_uuid(1), false));
    let r = scaler.round().await?;
    assert_eq!(
        (r.released, r.granted),
        (1, 1),
        "GPU 1 released, GPU 2 takes its place"
    );
    assert_eq!(held(&leases(&mesh.js).await?), [gpu_uuid(0), gpu_uuid(2)]);
    // More demand than healthy GPUs: GPU 1 still stays out.
    publish_work(&mesh.js, "coder", 20).await?;
    for _ in 0..3 {
        scaler.round().await?;
        assert!(!leases(&mesh.js).await?.contains_key(&gpu_uuid(1)));
    }

    assert!(inventory.set_healthy(&gpu_uuid(1), true));
    scaler.round().await?;
    assert_eq!(
        held(&leases(&mesh.js).await?),
        [gpu_uuid(0), gpu_uuid(1), gpu_uuid(2)]
    );

    // A GPU that disappears is released as gone.
    assert!(inventory.remove(&gpu_uuid(2)));
    scaler.round().await?;
    assert_eq!(held(&leases(&mesh.js).await?), [gpu_uuid(0), gpu_uuid(1)]);

    let reasons: Vec<(String, String)> = lease_events(&mesh.js)
        .await?
        .into_iter()
        .filter(|e| e.1 == TYPE_RELEASED)
        .map(|e| (e.3.gpu, e.3.reason.unwrap_or_default()))
        .collect();
    assert_eq!(
        reasons,
        [
            (gpu_uuid(1), "unhealthy".to_owned()),
            (gpu_uuid(2), "gone".to_owned())
        ]
    );
    Ok(())
}

async fn next_set<S>(s: &mut S) -> anyhow::Result<Vec<gpu_scaler::AssignedGpu>>
where
    S: futures::Stream<Item = Result<Vec<gpu_scaler::AssignedGpu>, gpu_scaler::Error>> + Unpin,
{
    match tokio::time::timeout(WAIT, s.next()).await? {
        Some(set) => Ok(set?),
        None => anyhow::bail!("the watch ended"),
    }
}

#[tokio::test]
async fn workers_watch_their_pools_gpus() -> anyhow::Result<()> {
    let mesh = mesh().await?;
    let consumer = work_consumer(&mesh.js, "coder").await?;
    let cfg = config(
        3,
        Duration::from_millis(250),
        Duration::from_secs(15),
        &[
            ("coder", pool("coder", 10, 0, 3, Duration::ZERO)),
            ("reviewer", pool("reviewer", 10, 1, 1, LONG)),
        ],
    );
    let (mut scaler, _) = scaler(&mesh, &cfg, "scaler-a").await?;
    let mut coder = Box::pin(watch_pool(&mesh.js, "coder").await?);
    let mut reviewer = Box::pin(watch_pool(&mesh.js, "reviewer").await?);
    assert_eq!(
        next_set(&mut coder).await?,
        vec![],
        "first item: the current (empty) set"
    );

    scaler.round().await?; // reviewer's min_gpus = 1
    let mut r = next_set(&mut reviewer).await?;
    if r.is_empty() {
        r = next_set(&mut reviewer).await?;
    }
    assert_eq!(cuda_visible_devices(&r), gpu_uuid(0));

    publish_work(&mesh.js, "coder", 15).await?;
    scaler.round().await?;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen = next_set(&mut coder).await?;
    }
    assert_eq!(
        cuda_visible_devices(&seen),
        format!("{},{}", gpu_uuid(1), gpu_uuid(2))
    );
    assert!(
        seen.iter()
            .all(|g| g.pool == "coder" && g.holder == "scaler-a")
    );

    drain(&consumer).await?;
    scaler.round().await?;
    while !seen.is_empty() {
        seen = next_set(&mut coder).await?;
    }
    Ok(())
}

#[tokio::test]
async fn overview_shows_leases_within_a_second_and_their_release_after_the_cooldown()
-> anyhow::Result<()> {
    let mesh = mesh().await?;
    let consumer = work_consumer(&mesh.js, "coder").await?;
    let cooldown = Duration::from_secs(1);
    let cfg = config(
        4,
        Duration::from_millis(250),
        Duration::from_secs(15),
        &[("coder", pool("coder", 10, 0, 4, cooldown))],
    );
    let running = spawn_scaler(&mesh, &cfg, "scaler-a").await?;
    let wait = Duration::from_millis(200);

    let quiet = eventually(WAIT, "the scaler's first round in the overview", || async {
        let o = overview::gather(&mesh.client, None, wait).await.ok()?;
        (!o.scalers.first()?.updated_at.is_empty()).then_some(o)
    })
    .await?;
    assert_eq!(quiet.scalers.len(), 1);
    assert_eq!(quiet.scalers[0].gpus.len(), 4);
    assert!(quiet.leases.is_empty());

    publish_work(&mesh.js, "coder", 30).await?;
    let burst = Instant::now();
    let shown = eventually(WAIT, "3 leases in the overview", || async {
        let o = overview::gather(&mesh.client, None, Duration::from_millis(100))
            .await
            .ok()?;
        (o.leases_of("coder") == 3).then_some(o)
    })
    .await?;
    println!(
        "`meshctl gpus` showed the leases {:?} after the burst:\n{shown}",
        burst.elapsed()
    );
    let text = shown.to_string();
    assert!(
        text.contains(&gpu_uuid(0)) && text.contains("scaler-a"),
        "{text}"
    );
    assert!(text.contains("coder"), "{text}");

    drain(&consumer).await?;
    let drained = Instant::now();
    let after = eventually(WAIT, "no leases in the overview", || async {
        let o = overview::gather(&mesh.client, None, Duration::from_millis(100))
            .await
            .ok()?;
        (o.leases_of("coder") == 0 && o.scalers.first()?.pools.first()?.decision.backlog == Some(0))
            .then_some(o)
    })
    .await?;
    println!("released {:?} after the drain:\n{after}", drained.elapsed());
    assert!(
        drained.elapsed() >= cooldown / 2,
        "released before the cooldown"
    );
    running.stop().await;

    // With no scaler answering, the config still gives the demand.
    publish_work(&mesh.js, "coder", 5).await?;
    let offline = overview::gather(&mesh.client, Some(&cfg), wait).await?;
    assert!(offline.scalers.is_empty());
    assert_eq!(offline.local_pools[0].backlog, Ok(5));
    assert_eq!(offline.local_pools[0].desired, 1);
    assert!(offline.to_string().contains("No GPU scaler answered"));
    Ok(())
}

#[tokio::test]
async fn binary_runs_from_a_config_file_and_stops_on_sigterm() -> anyhow::Result<()> {
    let mesh = mesh().await?;
    let _consumer = work_consumer(&mesh.js, "coder").await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("gpu-scaler.toml");
    std::fs::write(
        &config,
        format!(
            r#"
poll_interval = "100ms"
inventory = "declared"

[[gpu]]
uuid = "{}"

[pools.coder]
subjects = ["mesh.deliver.coder.>"]
target_backlog_per_gpu = 10
max_gpus = 1
"#,
            gpu_uuid(0)
        ),
    )?;
    let ready = dir.path().join("ready");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gpu-scaler"))
        .arg("--nats-url")
        .arg(mesh.nats.url())
        .arg("--config")
        .arg(&config)
        .arg("--ready-file")
        .arg(&ready)
        .arg("--instance")
        .arg("bin-1")
        .spawn()?;
    eventually(WAIT, "the ready file", || async {
        ready.exists().then_some(())
    })
    .await?;
    publish_work(&mesh.js, "coder", 1).await?;
    let lease = eventually(WAIT, "a lease from the binary", || async {
        leases_of(&mesh.js, "coder").await.ok()?.pop()
    })
    .await?;
    assert_eq!(lease.holder, "bin-1");

    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()?;
    assert!(status.success());
    let exit = eventually(WAIT, "the binary to exit", || {
        let done = child.try_wait().ok().flatten();
        async move { done }
    })
    .await?;
    assert!(exit.success(), "exit status {exit}");
    assert!(!ready.exists(), "ready file removed on exit");

    // A config with a typo is refused with the field's name.
    std::fs::write(
        &config,
        "[pools.coder]\nsubjects = [\"x\"]\ntarget_backlog_per_gpu = 1\nmax_gpus = 1\ncooldwon = \"1s\"\n",
    )?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gpu-scaler"))
        .arg("--config")
        .arg(&config)
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cooldwon"), "{stderr}");

    // Started as `meshctl up` does (no config): ready, leasing nothing.
    let mut bare = std::process::Command::new(env!("CARGO_BIN_EXE_gpu-scaler"))
        .env_remove("GPU_SCALER_CONFIG")
        .arg("--nats-url")
        .arg(mesh.nats.url())
        .arg("--ready-file")
        .arg(&ready)
        .spawn()?;
    eventually(WAIT, "the bare scaler's ready file", || async {
        ready.exists().then_some(())
    })
    .await?;
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(bare.id().to_string())
        .status()?;
    let exit = eventually(WAIT, "the bare scaler to exit", || {
        let done = bare.try_wait().ok().flatten();
        async move { done }
    })
    .await?;
    assert!(exit.success(), "exit status {exit}");
    Ok(())
}

#[tokio::test]
async fn the_scaler_rides_out_a_broker_restart() -> anyhow::Result<()> {
    let mut mesh = mesh().await?;
    let _consumer = work_consumer(&mesh.js, "coder").await?;
    let cfg = config(
        2,
        Duration::from_millis(100),
        Duration::from_secs(15),
        &[("coder", pool("coder", 10, 0, 2, LONG))],
    );
    let running = spawn_scaler(&mesh, &cfg, "scaler-a").await?;
    publish_work(&mesh.js, "coder", 5).await?;
    eventually(WAIT, "1 lease", || async {
        (leases_of(&mesh.js, "coder").await.ok()?.len() == 1).then_some(())
    })
    .await?;

    mesh.nats.restart().await?;
    // The scaler's client reconnects on its own; so does the test's.
    eventually(WAIT, "the test client to publish again", || async {
        publish_work(&mesh.js, "coder", 10).await.ok()
    })
    .await?;
    let held = eventually(WAIT, "2 leases after the restart", || async {
        let held = leases_of(&mesh.js, "coder").await.ok()?;
        (held.len() == 2).then_some(held)
    })
    .await?;
    assert!(held.iter().all(|l| l.holder == "scaler-a"));
    assert!(!running.task.is_finished());
    running.stop().await;
    Ok(())
}
