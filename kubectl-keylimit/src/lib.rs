//! `kubectl keylimit`: the everyday key operations, on the user's kubeconfig.
//!
//! - `keys create NAME --policy P` creates an ApiKey, waits for the operator to generate its
//!   key, and prints the key (the only time the plugin shows it);
//! - `usage` shows every key's limits with a bar of the use the operator has aggregated from
//!   the sidecars' reports, and when exhausted keys reset;
//! - `rotate NAME` writes a new key into the key's Secret and prints it; with
//!   `spec.rotation` the old key keeps working for `previousValidFor`;
//! - `explain NAME` says why a key is refused right now.
//!
//! Output follows kubectl: a table by default, `--no-headers`, `-o json|yaml`.
#![forbid(unsafe_code)]

pub mod view;

use std::collections::BTreeMap;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use keylimit_operator::crd::{ApiKey, ApiKeySpec, PolicyRef, RateLimitPolicy};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubeconfig: {0}")]
    Config(String),
    #[error("{0}")]
    Kube(#[from] kube::Error),
    #[error("ApiKey {0} already exists in namespace {1}")]
    Exists(String, String),
    #[error("ApiKey {0} not found in namespace {1}")]
    NotFound(String, String),
    #[error("timed out after {0:?} waiting for {1} (is the keylimit operator running?)")]
    Timeout(Duration, String),
    #[error("Secret {0} has no data key {1:?}")]
    NoKeyData(String, String),
    #[error("encoding output: {0}")]
    Encode(String),
    #[error("ApiKey {0} is in a rotation until {1}: rotating again now would cut off its previous key at once (pass --force to do that)")]
    RotationInProgress(String, String),
    #[error("Secret {0} changed while rotating (someone else wrote it): nothing was written, run the command again")]
    Conflict(String),
}

#[derive(Parser, Debug)]
#[command(
    name = "kubectl keylimit",
    about = "keylimit API keys: create, rotate, usage, explain"
)]
pub struct Cli {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Tables without the header line.
    #[arg(long, global = true)]
    pub no_headers: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Manage keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Per-key use against each limit, with reset times.
    Usage {
        /// Only keys bound to this policy.
        #[arg(long)]
        policy: Option<String>,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Write a new key into the key's Secret and print it. With the ApiKey's
    /// `spec.rotation.previousValidFor` the old key keeps working that long, on the same
    /// counters; without it the old key stops working as soon as the sidecars reload.
    Rotate {
        name: String,
        /// Rotate even while the previous rotation's overlap lasts (its old key stops working).
        #[arg(long)]
        force: bool,
    },
    /// Why a key is refused right now.
    Explain { name: String },
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Create an ApiKey bound to a policy and print its generated key once.
    Create {
        name: String,
        #[arg(long)]
        policy: String,
        #[arg(long)]
        display_name: Option<String>,
        #[arg(long)]
        owner: Option<String>,
        /// How long to wait for the operator to generate the key.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| format!("not a duration: {s}"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("not a duration: {s} (use 30s or 2m)")),
    }
}

/// Parses the command line and runs it; errors go to stderr with exit code 1.
pub async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(out) => {
            print!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn client(cli: &Cli) -> Result<(Client, String), Error> {
    let opts = KubeConfigOptions {
        context: cli.context.clone(),
        ..Default::default()
    };
    let config = match Kubeconfig::read() {
        Ok(kc) => kube::Config::from_custom_kubeconfig(kc, &opts)
            .await
            .map_err(|e| Error::Config(e.to_string()))?,
        // No kubeconfig: in a pod, use its ServiceAccount like kubectl does.
        Err(_) => kube::Config::infer()
            .await
            .map_err(|e| Error::Config(e.to_string()))?,
    };
    let ns = cli
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config)?;
    Ok((client, ns))
}

/// Runs one command and returns what to print on stdout.
pub async fn run(cli: Cli) -> Result<String, Error> {
    let (client, ns) = client(&cli).await?;
    match &cli.command {
        Command::Keys {
            command:
                KeysCommand::Create {
                    name,
                    policy,
                    display_name,
                    owner,
                    timeout,
                },
        } => {
            let created = create_key(
                &client,
                &ns,
                name,
                ApiKeySpec {
                    policy_ref: PolicyRef {
                        name: policy.clone(),
                    },
                    display_name: display_name.clone(),
                    owner: owner.clone(),
                    disabled: false,
                    expires_at: None,
                    secret_ref: None,
                    overrides: None,
                    rotation: None,
                },
                *timeout,
            )
            .await?;
            match cli.output {
                Output::Table => {
                    eprintln!(
                        "ApiKey {ns}/{name} created; its key (shown once here, kept in Secret {}):",
                        created.secret
                    );
                    Ok(format!("{}\n", created.key))
                }
                o => encode(&created, o),
            }
        }
        Command::Rotate { name, force } => {
            let rotated = rotate(&client, &ns, name, *force, Timestamp::now()).await?;
            match cli.output {
                Output::Table => {
                    match &rotated.previous_valid_until {
                        Some(t) => eprintln!(
                            "wrote a new key into Secret {}; the previous key keeps working until {t}:",
                            rotated.key.secret
                        ),
                        None => eprintln!(
                            "wrote a new key into Secret {}; the previous key stops working when the sidecars reload:",
                            rotated.key.secret
                        ),
                    }
                    Ok(format!("{}\n", rotated.key.key))
                }
                o => encode(&rotated, o),
            }
        }
        Command::Usage {
            policy,
            all_namespaces,
        } => {
            let keys_api: Api<ApiKey> = if *all_namespaces {
                Api::all(client.clone())
            } else {
                Api::namespaced(client.clone(), &ns)
            };
            let pol_api: Api<RateLimitPolicy> = if *all_namespaces {
                Api::all(client.clone())
            } else {
                Api::namespaced(client.clone(), &ns)
            };
            let policies: BTreeMap<(String, String), RateLimitPolicy> = pol_api
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .map(|p| {
                    (
                        (
                            p.metadata.namespace.clone().unwrap_or_default(),
                            p.metadata.name.clone().unwrap_or_default(),
                        ),
                        p,
                    )
                })
                .collect();
            let mut rows = vec![];
            for k in keys_api.list(&ListParams::default()).await?.items {
                if policy
                    .as_ref()
                    .is_some_and(|p| p != &k.spec.policy_ref.name)
                {
                    continue;
                }
                let pk = (
                    k.metadata.namespace.clone().unwrap_or_default(),
                    k.spec.policy_ref.name.clone(),
                );
                rows.extend(view::usage(&k, policies.get(&pk)));
            }
            match cli.output {
                Output::Table => Ok(usage_table(&rows, *all_namespaces, cli.no_headers)),
                o => encode(&rows, o),
            }
        }
        Command::Explain { name } => {
            let keys: Api<ApiKey> = Api::namespaced(client.clone(), &ns);
            let key = keys
                .get_opt(name)
                .await?
                .ok_or_else(|| Error::NotFound(name.clone(), ns.clone()))?;
            let policies: Api<RateLimitPolicy> = Api::namespaced(client.clone(), &ns);
            let policy = policies.get_opt(&key.spec.policy_ref.name).await?;
            let (secret, _) = keylimit_operator::render::secret_ref(&key);
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
            // Without `get` on Secrets the plugin still explains everything else.
            let present = match secrets.get_metadata_opt(&secret).await {
                Ok(s) => Some(s.is_some_and(|s| {
                    s.metadata
                        .labels
                        .is_some_and(|l| l.get("keylimit.dev/secret").is_some_and(|v| v == "true"))
                })),
                Err(_) => None,
            };
            let e = view::explain(&key, policy.as_ref(), present, Timestamp::now());
            match cli.output {
                Output::Table => {
                    let verdict = match e.refused_with {
                        Some(code) => format!("refused with {code}"),
                        None => "admitted".to_string(),
                    };
                    let mut out = format!(
                        "ApiKey {}/{} (policy {}): {verdict}\n",
                        e.namespace, e.key, e.policy
                    );
                    for r in &e.reasons {
                        out.push_str(&format!("  - {r}\n"));
                    }
                    Ok(out)
                }
                o => encode(&e, o),
            }
        }
    }
}

fn encode<T: Serialize>(v: &T, o: Output) -> Result<String, Error> {
    match o {
        Output::Json => serde_json::to_string_pretty(v)
            .map(|s| s + "\n")
            .map_err(|e| Error::Encode(e.to_string())),
        _ => serde_yaml::to_string(v).map_err(|e| Error::Encode(e.to_string())),
    }
}

/// Columns padded to their widest cell, like kubectl's printer.
fn table(header: &[&str], rows: &[Vec<String>], no_headers: bool) -> String {
    let mut all: Vec<Vec<String>> = vec![];
    if !no_headers {
        all.push(header.iter().map(|h| h.to_string()).collect());
    }
    all.extend(rows.iter().cloned());
    let widths: Vec<usize> = (0..header.len())
        .map(|i| all.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &all {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

fn usage_table(rows: &[view::LimitUsage], namespaces: bool, no_headers: bool) -> String {
    let now = Timestamp::now();
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut cells = vec![];
            if namespaces {
                cells.push(r.namespace.clone());
            }
            let counts = match (r.used, r.max) {
                (Some(u), Some(m)) => format!(" {u}/{m}"),
                _ => String::new(),
            };
            cells.extend([
                r.key.clone(),
                r.policy.clone(),
                format!("{} {}", r.kind, r.limit),
                r.allowance.clone(),
                format!("{}{counts}", view::bar(r.fraction(), 20)),
                r.state.to_string(),
                r.resets_at
                    .as_deref()
                    .map(|t| format!("{t} ({})", view::relative(t, now).unwrap_or_default()))
                    .unwrap_or_else(|| "-".into()),
            ]);
            cells
        })
        .collect();
    let mut header = vec![];
    if namespaces {
        header.push("NAMESPACE");
    }
    header.extend([
        "NAME", "POLICY", "LIMIT", "ALLOWS", "USAGE", "STATE", "RESETS",
    ]);
    table(&header, &body, no_headers)
}

#[derive(Debug, Serialize)]
pub struct IssuedKey {
    pub namespace: String,
    pub name: String,
    pub secret: String,
    pub key: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RotatedKey {
    #[serde(flatten)]
    pub key: IssuedKey,
    /// When the previous key stops working (RFC 3339); absent: at the sidecars' next reload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_valid_until: Option<String>,
}

/// The merge patch that rotates `current` out for `new` in a Secret at `resource_version`.
/// With an overlap the old key moves to `<key>.previous` and the instant to
/// `<key>.rotated-at`; without one both are removed, so no stale previous key lingers. On
/// the first rotation (`first_rotation`) the old key is also kept as `<key>.counter-key`,
/// which keeps the key's counters where they are for good. The resourceVersion makes the
/// write fail rather than lose a concurrent rotation's key.
pub fn rotation_patch(
    data_key: &str,
    current: &[u8],
    new: &str,
    overlap: bool,
    first_rotation: bool,
    now: Timestamp,
    resource_version: &str,
) -> serde_json::Value {
    // ByteString serialises as base64, the way Secret data travels.
    let b64 =
        |b: &[u8]| serde_json::to_value(k8s_openapi::ByteString(b.to_vec())).unwrap_or_default();
    let prev = keylimit_operator::render::previous_data_key(data_key);
    let at = keylimit_operator::render::rotated_at_data_key(data_key);
    let mut data = serde_json::Map::new();
    data.insert(data_key.to_string(), b64(new.as_bytes()));
    if first_rotation {
        data.insert(
            keylimit_operator::render::counter_data_key(data_key),
            b64(current),
        );
    }
    if overlap {
        data.insert(prev, b64(current));
        data.insert(at, b64(now.to_string().as_bytes()));
    } else {
        data.insert(prev, serde_json::Value::Null);
        data.insert(at, serde_json::Value::Null);
    }
    serde_json::json!({
        "metadata": { "resourceVersion": resource_version },
        "data": data,
    })
}

async fn read_secret_key(
    secrets: &Api<Secret>,
    name: &str,
    data_key: &str,
    timeout: Duration,
) -> Result<String, Error> {
    let cond = |s: Option<&Secret>| {
        s.and_then(|s| s.data.as_ref())
            .is_some_and(|d| d.contains_key(data_key))
    };
    let secret = tokio::time::timeout(
        timeout,
        kube::runtime::wait::await_condition(secrets.clone(), name, cond),
    )
    .await
    .map_err(|_| Error::Timeout(timeout, format!("Secret {name}")))?
    .map_err(|e| Error::Config(e.to_string()))?;
    let bytes = secret
        .and_then(|s| s.data)
        .and_then(|mut d| d.remove(data_key))
        .ok_or_else(|| Error::NoKeyData(name.into(), data_key.into()))?;
    Ok(String::from_utf8_lossy(&bytes.0).into_owned())
}

async fn create_key(
    client: &Client,
    ns: &str,
    name: &str,
    spec: ApiKeySpec,
    timeout: Duration,
) -> Result<IssuedKey, Error> {
    let keys: Api<ApiKey> = Api::namespaced(client.clone(), ns);
    let key = match keys
        .create(&PostParams::default(), &ApiKey::new(name, spec))
        .await
    {
        Err(kube::Error::Api(e)) if e.code == 409 => {
            return Err(Error::Exists(name.into(), ns.into()))
        }
        r => r?,
    };
    let (secret, data_key) = keylimit_operator::render::secret_ref(&key);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let value = read_secret_key(&secrets, &secret, &data_key, timeout).await?;
    Ok(IssuedKey {
        namespace: ns.into(),
        name: name.into(),
        secret,
        key: value,
    })
}

async fn rotate(
    client: &Client,
    ns: &str,
    name: &str,
    force: bool,
    now: Timestamp,
) -> Result<RotatedKey, Error> {
    let keys: Api<ApiKey> = Api::namespaced(client.clone(), ns);
    let key = keys
        .get_opt(name)
        .await?
        .ok_or_else(|| Error::NotFound(name.into(), ns.into()))?;
    let (secret_name, data_key) = keylimit_operator::render::secret_ref(&key);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = secrets.get(&secret_name).await?;
    let cached = keylimit_operator::key_secret::KeySecret::from(secret.clone());
    let current = cached
        .get(&data_key)
        .ok_or_else(|| Error::NoKeyData(secret_name.clone(), data_key.clone()))?;
    let overlap = key
        .spec
        .rotation
        .as_ref()
        .and_then(|r| r.previous_valid_for_seconds());
    if let Some(until) = keylimit_operator::render::previous_valid_until(&key, Some(&cached)) {
        if until > now.as_second() && !force {
            let until = Timestamp::from_second(until).map_or(until.to_string(), |t| t.to_string());
            return Err(Error::RotationInProgress(name.into(), until));
        }
    }
    let value = keylimit_operator::controller::generate_key();
    let first_rotation = cached
        .get(&keylimit_operator::render::counter_data_key(&data_key))
        .is_none();
    let patch = rotation_patch(
        &data_key,
        current,
        &value,
        overlap.is_some(),
        first_rotation,
        now,
        secret
            .metadata
            .resource_version
            .as_deref()
            .unwrap_or_default(),
    );
    // A merge patch touches only these data keys; the Secret's other keys, labels and owner
    // stay as they are.
    match secrets
        .patch(&secret_name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Err(kube::Error::Api(e)) if e.code == 409 => return Err(Error::Conflict(secret_name)),
        r => r?,
    };
    Ok(RotatedKey {
        key: IssuedKey {
            namespace: ns.into(),
            name: name.into(),
            secret: secret_name,
            key: value,
        },
        previous_valid_until: overlap.and_then(|s| {
            Timestamp::from_second(now.as_second().saturating_add(s))
                .ok()
                .map(|t| t.to_string())
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_kubectl_flags() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(parse_duration("1h").is_err());
        assert!(parse_duration("abc").is_err());
    }

    #[test]
    fn a_rotation_with_overlap_keeps_the_old_key_and_one_without_clears_it() {
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let p = rotation_patch(
            "key",
            b"old-material",
            "new-material",
            true,
            true,
            now,
            "42",
        );
        assert_eq!(p["metadata"]["resourceVersion"], "42");
        assert_eq!(p["data"]["key"], "bmV3LW1hdGVyaWFs");
        assert_eq!(p["data"]["key.previous"], "b2xkLW1hdGVyaWFs");
        // "2026-01-01T00:00:00Z", as the operator parses it.
        assert_eq!(p["data"]["key.rotated-at"], "MjAyNi0wMS0wMVQwMDowMDowMFo=");
        assert_eq!(p["data"]["key.counter-key"], "b2xkLW1hdGVyaWFs");
        // A later rotation without overlap: the counter key stays as it is.
        let p = rotation_patch("api", b"old", "new", false, false, now, "7");
        assert!(p["data"]["api.previous"].is_null() && p["data"]["api.rotated-at"].is_null());
        assert_eq!(p["data"].as_object().unwrap().len(), 3);
    }

    #[test]
    fn table_pads_columns_and_drops_headers_on_request() {
        let rows = vec![vec!["a".to_string(), "long value".to_string()]];
        assert_eq!(
            table(&["NAME", "X"], &rows, false),
            "NAME   X\na      long value\n"
        );
        assert_eq!(table(&["NAME", "X"], &rows, true), "a   long value\n");
    }
}
