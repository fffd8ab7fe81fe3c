//! The binary's command line: help, and refusals before anything connects. (Having an
//! integration test also makes `cargo test --workspace` build the `firmware-sim`
//! binary that the end-to-end tests in tests/tests/firmware_sim.rs run.)

use std::process::Command;

fn sim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_firmware-sim"))
        .args(args)
        .env_remove("FIRMWARE_SIM_TOKEN")
        .output()
        .expect("the firmware-sim binary runs")
}

/// Runs firmware-sim with `args`, which it must refuse (exit code 2); its stderr.
fn refused(args: &[&str]) -> String {
    let out = sim(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    stderr
}

#[test]
fn help_names_the_main_flags() {
    let out = sim(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--hub",
        "--devices",
        "--rate",
        "--qos",
        "--verify",
        "--target",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

#[test]
fn refusals_exit_2_with_a_reason() {
    assert!(refused(&["--devices", "5"]).contains("--data-dir"));
    assert!(refused(&["--target", "mqtt://127.0.0.1:1", "--rate", "0"]).contains("--rate"));
}

#[test]
fn scenario_combinations_that_make_no_sense_are_refused() {
    let target = ["--target", "mqtt://127.0.0.1:1"];
    let cases: &[(&[&str], &str)] = &[
        (&["--scenario", "methods"], "methods"),
        (&["--scenario", "twin"], "twin"),
        (&["--scenario", "twin", "--flap", "0.1"], "--flap"),
        (&["--flap", "1.5"], "fraction"),
        (&["--total", "5"], "--total"),
        (&["--storm", "restart"], "--scenario storm"),
        (&["--workers", "5", "--devices", "2"], "--workers"),
        (&["--workers", "0"], "--workers"),
        (&["--source-addrs", "127.0.0.9-127.0.0.2"], "backwards"),
        (&["--scenario", "connections", "--sdk"], "--sdk"),
        (&["--scenario", "nonsense"], "connect-rate"),
        (&["--hub-pid", "1", "--hub-pid-file", "/tmp/x"], "--hub-pid"),
    ];
    for (args, needle) in cases {
        let all: Vec<&str> = target.iter().chain(args.iter()).copied().collect();
        let stderr = refused(&all);
        assert!(
            stderr.contains(needle),
            "{all:?}: no {needle:?} in {stderr}"
        );
    }
    assert!(
        refused(&["--data-dir", "/nonexistent", "--workers", "2", "--verify"])
            .contains("--workers")
    );
}

#[test]
fn ramp_belongs_to_the_telemetry_scenario() {
    let stderr = refused(&[
        "--target",
        "mqtt://127.0.0.1:1",
        "--scenario",
        "storm",
        "--ramp",
        "10",
    ]);
    assert!(stderr.contains("--connect-inflight"), "{stderr}");
}

#[test]
fn scenario_files_with_unknown_keys_or_clashing_groups_are_refused() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("the scenario is written");
        path.to_string_lossy().into_owned()
    };
    let target = ["--target", "mqtt://127.0.0.1:1"];
    let unknown = write(
        "unknown.toml",
        "[[group]]\nname = \"a\"\ndevices = 1\nrtae = 5\n",
    );
    let stderr = refused(&[&target[..], &["--scenario-file", &unknown]].concat());
    assert!(stderr.contains("rtae"), "{stderr}");
    let clash = write(
        "clash.toml",
        "[[group]]\nname = \"a\"\ndevices = 1\nprefix = \"d\"\n[[group]]\nname = \"b\"\ndevices = 1\nprefix = \"d\"\n",
    );
    assert!(
        refused(&[&target[..], &["--scenario-file", &clash]].concat()).contains("share device ids")
    );
    // A plain broker has no twin: a group that reports one is refused by name.
    let twin = write(
        "twin.toml",
        "[[group]]\nname = \"gw\"\ndevices = 1\ntwin_every = \"1s\"\n",
    );
    assert!(refused(&[&target[..], &["--scenario-file", &twin]].concat()).contains("group gw"));
    assert!(
        refused(&[&target[..], &["--scenario-file", "/no/such/file.toml"]].concat())
            .contains("/no/such/file.toml")
    );
}

#[test]
fn tls_and_x509_need_the_data_dir_and_the_hub() {
    let cases: &[(&[&str], &[&str])] = &[
        (
            &[
                "--hub",
                "http://127.0.0.1:1",
                "--token",
                "t",
                "--auth",
                "x509",
            ],
            &["--data-dir"],
        ),
        (
            &["--target", "mqtt://127.0.0.1:1", "--tls"],
            &["plain MQTT --target", "--ca-file"],
        ),
        (
            &["--target", "mqtt://127.0.0.1:1", "--auth", "x509"],
            &["CA key"],
        ),
        // --ca-file is for a plain broker's TLS listener only.
        (
            &[
                "--data-dir",
                "/nonexistent",
                "--ca-file",
                "/nonexistent/ca.pem",
            ],
            &["--target"],
        ),
        // The other scenarios and --flap connect over plain TCP: TLS is refused, not
        // silently dropped.
        (
            &[
                "--data-dir",
                "/nonexistent",
                "--tls",
                "--scenario",
                "connections",
            ],
            &["plain TCP"],
        ),
        (
            &["--data-dir", "/nonexistent", "--tls", "--flap", "0.1"],
            &["plain TCP"],
        ),
    ];
    for (args, needles) in cases {
        let stderr = refused(args);
        for needle in *needles {
            assert!(
                stderr.contains(needle),
                "{args:?}: no {needle:?} in {stderr}"
            );
        }
    }
}
