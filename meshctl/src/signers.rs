//! `meshctl signers`: the trusted decision signers in `mesh-signers`
//! (`docs/contract.md`, "Signed decisions"), and the local stack's signing
//! keys (`.agentmesh/auth/signing/<service>.nk`) that `meshctl up` makes
//! and registers.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use async_nats::jetstream::{self, kv};
use clap::Subcommand;
use futures::StreamExt;
use schemas::signing::{SignerRecord, SignerStatus, SigningKey};
use schemas::subjects;

use crate::procs::Home;
use crate::servers::Endpoints;

/// The services that sign: the worker signs decisions, the sink signs
/// audit checkpoints.
pub(crate) const SIGNING_SERVICES: [&str; 2] = ["policy-worker", "audit-sink"];

/// `meshctl signers …`
#[derive(Debug, Subcommand)]
pub(crate) enum SignersCommand {
    /// List every signer: public key, name, status, dates.
    List {
        #[command(flatten)]
        output: crate::output::OutputArg,
    },
    /// Trust a signer: add its public key (`N…`) as active.
    Add {
        /// The signer's nkey public key.
        public_key: String,
        /// Who holds it (e.g. `policy-worker-2`).
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Retire a signer: what it signed until now stays valid, nothing later.
    Retire {
        /// The signer's public key.
        public_key: String,
    },
    /// Revoke a signer: nothing it ever signed is trusted any more.
    Revoke {
        /// The signer's public key.
        public_key: String,
    },
    /// Give a local service (policy-worker or audit-sink) a new key: the new
    /// key is added, the old one retired; restart the service
    /// (`meshctl down`, `meshctl up`) to sign with it.
    Rotate {
        /// The local service.
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(SIGNING_SERVICES))]
        service: String,
    },
}

/// The signing key file of local `service`.
pub(crate) fn key_file(home: &Home, service: &str) -> PathBuf {
    home.root()
        .join("auth")
        .join("signing")
        .join(format!("{service}.nk"))
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

async fn bucket(js: &jetstream::Context) -> anyhow::Result<kv::Store> {
    js.get_key_value(subjects::BUCKET_SIGNERS)
        .await
        .with_context(|| {
            format!(
                "opening `{}` (start the stack with `meshctl up`)",
                subjects::BUCKET_SIGNERS
            )
        })
}

/// Every record in the bucket.
pub(crate) async fn records(kv: &kv::Store) -> anyhow::Result<Vec<SignerRecord>> {
    let mut keys = kv.keys().await?.boxed();
    let mut out = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key?;
        if let Some(value) = kv.get(&key).await? {
            out.push(
                serde_json::from_slice::<SignerRecord>(&value)
                    .with_context(|| format!("signer record `{key}`"))?,
            );
        }
    }
    out.sort_by(|a, b| (&a.added_at, &a.public_key).cmp(&(&b.added_at, &b.public_key)));
    Ok(out)
}

async fn put(kv: &kv::Store, record: &SignerRecord) -> anyhow::Result<()> {
    kv.put(&record.public_key, serde_json::to_vec(record)?.into())
        .await
        .with_context(|| format!("writing signer `{}`", record.public_key))?;
    Ok(())
}

fn active(public_key: &str, name: &str) -> SignerRecord {
    SignerRecord {
        public_key: public_key.to_owned(),
        name: name.to_owned(),
        status: SignerStatus::Active,
        added_at: now(),
        retired_at: String::new(),
        revoked_at: String::new(),
    }
}

/// Makes the local signing key of each of [`SIGNING_SERVICES`] that has
/// none, and adds each to `mesh-signers` unless it is there. Returns the
/// key files.
pub(crate) async fn ensure_local_keys(
    home: &Home,
    js: &jetstream::Context,
) -> anyhow::Result<Vec<(&'static str, PathBuf, String)>> {
    let kv = bucket(js).await?;
    let mut out = Vec::new();
    for service in SIGNING_SERVICES {
        let file = key_file(home, service);
        if !file.is_file() {
            let key = SigningKey::generate();
            broker_config::credentials::write_seed_file(&file, &key.seed())?;
        }
        let key = broker_config::credentials::read_signing_key_file(&file)?;
        let public = key.public_key().to_owned();
        match kv.get(&public).await? {
            None => put(&kv, &active(&public, service)).await?,
            Some(value) => {
                let record: SignerRecord = serde_json::from_slice(&value)?;
                if record.status != SignerStatus::Active {
                    errln!(
                        "warning: the signing key of `{service}` ({public}) is {} in `{}`: recipients refuse what it signs now (`meshctl signers rotate {service}`)",
                        record.status,
                        subjects::BUCKET_SIGNERS
                    );
                }
            }
        }
        out.push((service, file, public));
    }
    Ok(out)
}

async fn update(
    kv: &kv::Store,
    public_key: &str,
    change: impl FnOnce(&mut SignerRecord),
) -> anyhow::Result<SignerRecord> {
    let value = kv
        .get(public_key)
        .await?
        .with_context(|| format!("no signer `{public_key}` in `{}`", subjects::BUCKET_SIGNERS))?;
    let mut record: SignerRecord = serde_json::from_slice(&value)?;
    change(&mut record);
    put(kv, &record).await?;
    Ok(record)
}

/// Retires `public_key` as of now (what it signed until now stays valid).
pub(crate) async fn retire(kv: &kv::Store, public_key: &str) -> anyhow::Result<SignerRecord> {
    update(kv, public_key, |r| {
        if r.status == SignerStatus::Active {
            r.status = SignerStatus::Retired;
            r.retired_at = now();
        }
    })
    .await
}

/// Runs `meshctl signers …`.
pub(crate) async fn run(
    command: SignersCommand,
    home: &Home,
    endpoints: &Endpoints,
) -> anyhow::Result<bool> {
    let js = jetstream::new(endpoints.connect_nats().await?);
    let kv = bucket(&js).await?;
    match command {
        SignersCommand::List { output } => {
            let records = records(&kv).await?;
            if output.json() {
                crate::output::print_json(&records)?;
                return Ok(true);
            }
            if records.is_empty() {
                outln!("no signers in `{}`", subjects::BUCKET_SIGNERS);
            }
            for r in records {
                let since = match r.status {
                    SignerStatus::Active => format!("added {}", r.added_at),
                    SignerStatus::Retired => format!("retired {}", r.retired_at),
                    SignerStatus::Revoked => format!("revoked {}", r.revoked_at),
                };
                outln!("{}  {:<8} {:<20} {since}", r.public_key, r.status, r.name);
            }
        }
        SignersCommand::Add { public_key, name } => {
            nkeys::KeyPair::from_public_key(&public_key)
                .map_err(|e| anyhow::anyhow!("`{public_key}` is not an nkey public key: {e}"))?;
            put(&kv, &active(&public_key, &name)).await?;
            outln!("signer {public_key} added (active)");
        }
        SignersCommand::Retire { public_key } => {
            let r = retire(&kv, &public_key).await?;
            outln!("signer {public_key} {} at {}", r.status, r.retired_at);
        }
        SignersCommand::Revoke { public_key } => {
            let r = update(&kv, &public_key, |r| {
                r.status = SignerStatus::Revoked;
                r.revoked_at = now();
            })
            .await?;
            outln!("signer {public_key} revoked at {}", r.revoked_at);
        }
        SignersCommand::Rotate { service } => {
            anyhow::ensure!(
                SIGNING_SERVICES.contains(&service.as_str()),
                "`{service}` does not sign: rotate one of {}",
                SIGNING_SERVICES.join(", ")
            );
            rotate(home, &kv, &service).await?;
        }
    }
    Ok(true)
}

async fn rotate(home: &Home, kv: &kv::Store, service: &str) -> anyhow::Result<()> {
    let file = key_file(home, service);
    let old = read_public(&file).ok();
    let key = SigningKey::generate();
    put(kv, &active(key.public_key(), service)).await?;
    broker_config::credentials::write_seed_file(&file, &key.seed())?;
    outln!("{service}: new signing key {} (active)", key.public_key());
    if let Some(old) = old {
        let r = retire(kv, &old).await?;
        outln!("{service}: old key {old} {} at {}", r.status, r.retired_at);
    }
    outln!("restart {service} to sign with the new key (`meshctl down`, `meshctl up`)");
    Ok(())
}

fn read_public(file: &Path) -> anyhow::Result<String> {
    Ok(broker_config::credentials::read_signing_key_file(file)?
        .public_key()
        .to_owned())
}
