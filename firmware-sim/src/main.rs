//! `firmware-sim`: simulates a fleet of devices against the hub or a plain MQTT
//! broker and reports throughput and latency (see `firmware-sim --help`).

use std::process::ExitCode;

use clap::Parser;
use firmware_sim::cli::Args;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(message) = args.validate() {
        eprintln!("firmware-sim: error: {message}");
        return ExitCode::from(2);
    }
    let json = args.json;
    let interrupt = async {
        // Without a signal handler there is no early end; the run still ends on time.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
        eprintln!("firmware-sim: interrupted; finishing with a partial report");
    };
    match firmware_sim::run::run(args, interrupt).await {
        Ok(report) => {
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(err) => {
                        eprintln!("firmware-sim: cannot write the report: {err}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{}", report.text());
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("firmware-sim: error: {err}");
            ExitCode::FAILURE
        }
    }
}
