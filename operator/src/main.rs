use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = keylimit_operator::Cli::parse();
    match keylimit_operator::main_entry(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keylimit-operator: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
