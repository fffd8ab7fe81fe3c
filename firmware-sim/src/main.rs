//! `firmware-sim`: simulates a fleet of devices against the hub or a plain MQTT
//! broker and reports throughput and latency (see `firmware-sim --help`).

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use firmware_sim::settings::Args;

#[tokio::main]
async fn main() -> ExitCode {
    // Parsed in two steps so a scenario file can tell flags given here from defaults.
    let matches = Args::command().get_matches();
    let mut args = Args::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
    if let Some(path) = args.scenario_file.clone()
        && let Err(err) = firmware_sim::scenario_file::apply(&path, &mut args, &matches)
    {
        eprintln!("firmware-sim: error: {err}");
        return ExitCode::from(2);
    }
    if let Err(message) = args.validate() {
        eprintln!("firmware-sim: error: {message}");
        return ExitCode::from(2);
    }
    raise_open_file_limit(u64::from(args.devices));
    let json = args.json;
    let interrupt = async {
        // Without a signal handler there is no early end; the run still ends on time.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
        eprintln!(
            "firmware-sim: interrupted; finishing with a partial report (Ctrl-C again quits)"
        );
        // The handler replaced the default action: a second Ctrl-C must still quit
        // at once if the drain or the read-back takes too long for the user.
        tokio::spawn(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        });
    };
    match firmware_sim::scenarios::run(args, interrupt).await {
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

/// Each device holds a socket: raise the soft open-file limit to the hard one so a
/// fleet larger than the usual 1,024 default fits, and say so when it cannot.
fn raise_open_file_limit(devices: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
        eprintln!("firmware-sim: cannot raise the open-file limit from {soft} to {hard}");
    }
    let limit = getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(soft, _)| soft);
    // A few dozen descriptors go to the runtime, the API client and stdio.
    if devices + 64 > limit {
        eprintln!(
            "firmware-sim: warning: {devices} devices need more than the {limit} open files \
             this process may hold; some connections will fail (raise `ulimit -n`)"
        );
    }
}
