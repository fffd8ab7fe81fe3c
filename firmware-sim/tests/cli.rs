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
    let out = sim(&["--devices", "5"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--data-dir"));
    let out = sim(&["--target", "mqtt://127.0.0.1:1", "--rate", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rate"));
}
