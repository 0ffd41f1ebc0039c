//! The tool-result cache on a broker with authorization: the policy worker
//! (with its own key) answers an agents-sdk `call_tool` repeat from
//! `mesh-tool-cache`, the SDK takes the cached answer like any other, the
//! tool's handler runs once, and no agent may read or write the bucket.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use agents_sdk::{Agent, ToolCall, ToolSpec};
use e2e::{SecureNats, WAIT};
use serde_json::json;
use testkit::eventually;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_call_tool_is_answered_from_the_cache_under_authorization() -> anyhow::Result<()>
{
    let mesh = SecureNats::start(&["planner", "coder"]).await?;
    let policies = testkit::policies_copy()?;
    std::fs::write(
        policies.path().join("cache.toml"),
        "[tools.\"code.search\"]\nttl_secs = 600\nscope = \"shared\"\n",
    )?;
    let dir = tempfile::tempdir()?;
    let ready = dir.path().join("worker.ready");
    let config = policy_worker::Config {
        nats: broker_config::NatsArgs {
            url: mesh.url(),
            credentials: broker_config::NatsCredentials {
                nkey_seed_file: Some(mesh.seed_file(broker_config::auth::POLICY_WORKER)?),
                creds_file: None,
            },
        },
        policies: policies.path().to_owned(),
        watch_policies: false,
        ready_file: Some(ready.clone()),
        signing_key: Some(mesh.trusted_signing_key().await?),
        ..Default::default()
    };
    let worker = CancellationToken::new();
    let handle = tokio::spawn(policy_worker::run(config, worker.clone()));
    eventually(WAIT, "the policy worker to become ready", || async {
        (ready.exists() || handle.is_finished()).then_some(())
    })
    .await?;
    anyhow::ensure!(!handle.is_finished(), "the policy worker stopped at start");

    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    let coder = Agent::builder("coder")
        .tool(ToolSpec::new("code.search"), move |call: ToolCall| {
            let count = count.clone();
            async move {
                count.fetch_add(1, Ordering::SeqCst);
                let args: serde_json::Value = call.args()?;
                Ok(json!({"matches": [args["query"].clone()]}))
            }
        })
        .nkey(mesh.seed("coder")?)
        .connect(mesh.url())
        .await?;
    let planner = Agent::builder("planner")
        .nkey(mesh.seed("planner")?)
        .connect(mesh.url())
        .await?;
    let stop = CancellationToken::new();
    let serving = tokio::spawn({
        let stop = stop.clone();
        async move { coder.serve(stop.cancelled_owned()).await }
    });

    let wf = planner.workflow();
    for _ in 0..3 {
        let result = wf
            .call_tool("code.search", json!({"query": "fn parse", "path": "src/"}))
            .timeout(WAIT)
            .await?;
        assert_eq!(result, json!({"matches": ["fn parse"]}));
    }
    // The first call reached the tool; the repeats were answered by the mesh.
    assert_eq!(served.load(Ordering::SeqCst), 1);

    // Agents have no grant on the bucket: neither read nor write.
    let js = mesh.jetstream("planner").await?;
    let opened = js.get_key_value("mesh-tool-cache").await;
    match opened {
        Err(_) => {}
        Ok(kv) => {
            assert!(kv.keys().await.is_err(), "an agent listed the cache");
            assert!(
                kv.put("r.x.y", "poison".into()).await.is_err(),
                "an agent wrote the cache"
            );
        }
    }

    stop.cancel();
    serving.await??;
    worker.cancel();
    Ok(())
}
