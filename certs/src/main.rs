//! `certs`: the development PKI on the command line (`certs ca`, `certs server`,
//! `certs device ID`), writing PEM pairs into a directory.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use certs::{Ca, SubjectAltNames};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Development PKI for the hub")]
struct Cli {
    /// Directory holding ca.pem/ca.key and where new files are written.
    #[arg(long, default_value = "certs", global = true)]
    dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new CA (ca.pem, ca.key); refuses to overwrite an existing one.
    Ca {
        /// Common name of the CA.
        #[arg(long, default_value = "hub development CA")]
        name: String,
    },
    /// Issue a server certificate (server.pem, server.key) signed by the CA.
    Server {
        /// DNS name the server is reached by (also added: localhost, 127.0.0.1, ::1).
        #[arg(long, default_value = "localhost")]
        hostname: String,
        /// Additional IP addresses to include.
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
    },
    /// Issue a device certificate (devices/ID.pem, devices/ID.key) with CN = ID, signed
    /// by the CA. ID must be a device id that can name a file (not `..`, `ca`, …).
    Device {
        /// The device id.
        id: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Ca { name } => {
            if Ca::read(&cli.dir, "ca")?.is_some() {
                anyhow::bail!("{} already holds a CA (ca.pem)", cli.dir.display());
            }
            Ca::generate(&name)?.write(&cli.dir, "ca")?;
            println!("{}", cli.dir.join("ca.pem").display());
        }
        Command::Server { hostname, ips } => {
            let ca = load_ca(&cli.dir)?;
            let names = SubjectAltNames::for_hub(&hostname, ips);
            ca.issue_server(&names)?.write(&cli.dir, "server")?;
            println!("{}", cli.dir.join("server.pem").display());
        }
        Command::Device { id } => {
            certs::check_device_name(&id)?;
            let ca = load_ca(&cli.dir)?;
            // A directory of their own: device files never sit next to the CA's.
            let path = ca.issue_device_into(&cli.dir.join("devices"), &id)?;
            println!("{}", path.display());
        }
    }
    Ok(())
}

fn load_ca(dir: &std::path::Path) -> Result<Ca> {
    Ca::read(dir, "ca")?
        .with_context(|| format!("no CA in {} (run `certs ca` first)", dir.display()))
}
