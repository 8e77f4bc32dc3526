//! `kubectl keylimit …`: see the library for the commands.

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    kubectl_keylimit::main().await
}
