//! File modes of the data directory: a hub started on a fresh directory creates it
//! 0700 and its secrets (store, keys, telemetry segments) 0600; one started on a
//! directory with looser modes tightens them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::Result;
use hub_tests::Hub;

fn mode(path: &Path) -> Result<u32> {
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o7777)
}

fn segments(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut found = Vec::new();
    for partition in std::fs::read_dir(dir.join("telemetry"))? {
        let partition = partition?.path();
        if partition.is_dir() {
            for file in std::fs::read_dir(&partition)? {
                found.push(file?.path());
            }
        }
    }
    Ok(found)
}

fn assert_private(dir: &Path) -> Result<()> {
    assert_eq!(mode(dir)?, 0o700, "data dir");
    for sub in ["certs", "telemetry"] {
        assert_eq!(mode(&dir.join(sub))?, 0o700, "{sub}/");
    }
    for file in [
        "hub.redb",
        "hub.lock",
        "service.key",
        "certs/ca.key",
        "certs/server.key",
        "telemetry/partitions",
    ] {
        assert_eq!(mode(&dir.join(file))?, 0o600, "{file}");
    }
    let segments = segments(dir)?;
    assert!(!segments.is_empty(), "segment files exist");
    for segment in segments {
        assert_eq!(mode(&segment)?, 0o600, "{}", segment.display());
        let partition = segment.parent().map(Path::to_path_buf).unwrap_or_default();
        assert_eq!(mode(&partition)?, 0o700, "{}", partition.display());
    }
    Ok(())
}

#[tokio::test]
async fn a_fresh_data_dir_is_private_to_the_hub_user() -> Result<()> {
    let parent = tempfile::tempdir()?;
    let dir = parent.path().join("fresh");
    let hub = Hub::start(&dir).await?;
    assert_private(&dir)?;
    assert!(hub.stop().await?.success());
    Ok(())
}

#[tokio::test]
async fn looser_modes_are_tightened_at_start_up() -> Result<()> {
    let parent = tempfile::tempdir()?;
    let dir = parent.path().join("old");
    let hub = Hub::start(&dir).await?;
    assert!(hub.stop().await?.success());
    // As an older hub left it: everything readable by everyone.
    let mut pending = vec![dir.clone()];
    while let Some(path) = pending.pop() {
        let loose = if path.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
            0o755
        } else {
            0o644
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(loose))?;
    }
    let hub = Hub::start(&dir).await?;
    assert_private(&dir)?;
    assert!(
        hub.stderr()
            .contains("tightened the permissions of a data dir entry"),
        "logged: {}",
        hub.stderr()
    );
    assert!(hub.stop().await?.success());
    Ok(())
}
