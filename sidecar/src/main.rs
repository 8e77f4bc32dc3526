use clap::Parser;

fn main() -> std::process::ExitCode {
    match keylimit_sidecar::run(keylimit_sidecar::Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keylimit-sidecar: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
