//! `hub print-config`: the precedence flags > `HUB_*` environment > file > defaults,
//! and a bad config failing with exit code 2 and a message naming the key.
//! (This file also makes `cargo test --workspace` build the `hub` binary that the
//! end-to-end tests in `tests/` start.)

use std::process::Command;

fn hub() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hub"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HUB_") {
            command.env_remove(key);
        }
    }
    command
}

fn print_config(command: &mut Command) -> hub::Config {
    let output = command.output().expect("run hub print-config");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    hub::Config::from_toml(&String::from_utf8_lossy(&output.stdout)).expect("TOML output")
}

#[test]
fn defaults_then_file_then_env_then_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("hub.toml");
    std::fs::write(
        &file,
        "hostname = 'from-file'\n[http]\nlisten = '127.0.0.1:7001'\n[mqtt]\ntcp_listen = '127.0.0.1:7002'\n",
    )
    .expect("write config");

    let defaults = print_config(hub().arg("print-config"));
    assert_eq!(defaults, hub::Config::default());

    let from_file = print_config(hub().args(["print-config", "--config"]).arg(&file));
    assert_eq!(from_file.hostname, "from-file");
    assert_eq!(from_file.http.listen.to_string(), "127.0.0.1:7001");

    let from_env = print_config(
        hub()
            .args(["print-config", "--config"])
            .arg(&file)
            .env("HUB_HOSTNAME", "from-env")
            .env("HUB_HTTP", "127.0.0.1:7003"),
    );
    assert_eq!(from_env.hostname, "from-env");
    assert_eq!(from_env.http.listen.to_string(), "127.0.0.1:7003");
    assert_eq!(
        from_env.mqtt.tcp_listen.to_string(),
        "127.0.0.1:7002",
        "file value kept"
    );

    let from_flag = print_config(
        hub()
            .args(["print-config", "--hostname", "from-flag", "--config"])
            .arg(&file)
            .env("HUB_HOSTNAME", "from-env"),
    );
    assert_eq!(from_flag.hostname, "from-flag");
}

#[test]
fn invalid_values_fail_with_exit_code_2_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "[mqtt]\nmax_packet_size = 10\n",
            "mqtt.max_packet_size must be ≥ 1024",
        ),
        ("[mqtt]\nmax_packet_size = 'big'\n", "max_packet_size"),
        ("[http]\nlisten = 'not an address'\n", "listen"),
        ("[http]\nlistn = '127.0.0.1:1'\n", "listn"),
        ("hostname = \n", "invalid config file"),
    ];
    for (text, expected) in cases {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, text).expect("write config");
        for subcommand in ["print-config", "serve"] {
            let output = hub()
                .arg(subcommand)
                .arg("--config")
                .arg(&file)
                .args(["--data-dir"])
                .arg(dir.path().join("data"))
                .output()
                .expect("run hub");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(
                output.status.code(),
                Some(2),
                "{subcommand} {text:?}: {stderr}"
            );
            assert!(stderr.contains(expected), "{subcommand} {text:?}: {stderr}");
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
    let missing = hub()
        .args(["serve", "--config"])
        .arg(dir.path().join("absent.toml"))
        .output()
        .expect("run hub");
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("absent.toml"));
}
