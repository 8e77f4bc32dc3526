//! `keylimit-project --namespace NS --policy P --dir DIR`: kubelet's ConfigMap volume for a
//! sidecar running as a local process (the demo and the local control plane have no kubelet).

use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    namespace: String,
    #[arg(long)]
    policy: String,
    #[arg(long)]
    dir: std::path::PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let client = kube::Client::try_default().await?;
    keylimit_e2e::project::project(client, &args.namespace, &args.policy, args.dir).await?;
    Ok(())
}
