//! Which JetStream streams hold the telemetry partitions, and where their leaders
//! are: one stream per partition, `telemetry-{p}` with the one subject
//! `telemetry.{p}`, so each partition has its own RAFT group and leader, and the
//! leaders are spread over the NATS nodes (a stream leader orders and replicates
//! every message of its stream: one stream for all partitions put all of that on
//! one node). A cluster created by an older hub keeps its single stream `telemetry`
//! (subjects `telemetry.*`) for every partition until an operator removes it.
//!
//! A partition's offsets are its stream's sequences minus one; a stream created when
//! consumer groups already hold checkpoints of that partition (the single stream was
//! removed) starts after the highest of them, so a group that had read everything
//! goes on where it was.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::stream::{self, DiscardPolicy, StorageType};

use super::NatsStore;
use super::checkpoints::NatsCheckpoints;
use crate::config::TelemetryConfig;
use crate::storage::StoreError;

/// The single stream of clusters created before issue 28.
pub const SHARED_STREAM: &str = "telemetry";
/// JetStream drops a message whose id it saw within this window.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long opening waits for every stream to have a leader after moving some.
const LEADER_WAIT: Duration = Duration::from_secs(10);

/// The subject of `partition`, the same in both layouts.
pub fn subject(partition: u32) -> String {
    format!("{SHARED_STREAM}.{partition}")
}

/// The stream of `partition` in the per-partition layout.
pub fn stream_name(partition: u32) -> String {
    format!("{SHARED_STREAM}-{partition}")
}

/// How the partitions map to streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One stream per partition (clusters created since issue 28).
    PerPartition,
    /// The one stream of an older cluster, for every partition.
    Shared,
}

/// The stream of each partition, in partition order (in the shared layout the same
/// stream for all).
pub async fn open_streams(
    store: &NatsStore,
    config: &TelemetryConfig,
) -> Result<(Layout, Vec<stream::Stream>), StoreError> {
    let retention = |subjects: Vec<String>, name: String, max_bytes: u64| stream::Config {
        name,
        subjects,
        num_replicas: store.replicas(),
        storage: StorageType::File,
        max_age: Duration::from_secs(config.retention_secs),
        max_bytes: i64::try_from(max_bytes).unwrap_or(i64::MAX),
        discard: DiscardPolicy::Old,
        duplicate_window: DUPLICATE_WINDOW,
        allow_direct: true,
        ..Default::default()
    };
    if existing(store, SHARED_STREAM).await?.is_some() {
        tracing::warn!(
            "telemetry stays on the one stream `{SHARED_STREAM}` this cluster was created with; remove it (after its consumers are done) to get a stream per partition"
        );
        let wanted = retention(
            vec![format!("{SHARED_STREAM}.*")],
            SHARED_STREAM.to_string(),
            config.retention_bytes,
        );
        let shared = store.stream(wanted).await?;
        return Ok((Layout::Shared, vec![shared; config.partitions as usize]));
    }
    // JetStream reserves a stream's maximum size on every replica's disk: the
    // partitions share the configured total, as the embedded log's do.
    let share = config.retention_bytes / u64::from(config.partitions.max(1));
    let mut first_sequences: Option<Vec<u64>> = None;
    let mut streams = Vec::with_capacity(config.partitions as usize);
    for partition in 0..config.partitions {
        let name = stream_name(partition);
        let mut wanted = retention(vec![subject(partition)], name.clone(), share);
        wanted.first_sequence = match existing(store, &name).await? {
            // An existing stream keeps the first sequence it was created with.
            Some(info) => info.config.first_sequence,
            None => {
                if first_sequences.is_none() {
                    first_sequences = Some(after_checkpoints(store, config.partitions).await?);
                }
                first_sequences
                    .as_ref()
                    .and_then(|firsts| firsts.get(partition as usize))
                    .copied()
                    .filter(|&first| first > 1)
            }
        };
        streams.push(store.stream(wanted).await?);
    }
    spread_leaders(store, &streams).await;
    Ok((Layout::PerPartition, streams))
}

/// The stream `name`'s info, or `None` when it does not exist.
async fn existing(store: &NatsStore, name: &str) -> Result<Option<stream::Info>, StoreError> {
    store
        .retrying(&format!("look up stream {name}"), || async {
            match store.jetstream().get_stream(name).await {
                Ok(stream) => Ok(Some(stream.cached_info().clone())),
                Err(err) => match err.kind() {
                    GetStreamErrorKind::JetStream(js)
                        if js.error_code()
                            == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND =>
                    {
                        Ok(None)
                    }
                    _ => Err(err),
                },
            }
        })
        .await
}

/// For each partition, the first sequence a new stream must start at so that no
/// consumer group's checkpoint lies beyond its end: the highest checkpoint plus one
/// (a checkpoint is the next offset to read, an offset a sequence minus one).
async fn after_checkpoints(store: &NatsStore, partitions: u32) -> Result<Vec<u64>, StoreError> {
    let highest = NatsCheckpoints::open(store)
        .await?
        .highest_per_partition()
        .await?;
    Ok((0..partitions)
        .map(|p| highest.get(&p).map_or(1, |&c| c.saturating_add(1)))
        .collect())
}

/// Moves stream leaders until no NATS node leads two more streams than another
/// (best effort: a failure is logged and the streams keep their leaders). Several
/// hubs starting at once may each move a stream; each only moves from the busiest
/// node to the idlest, so they converge.
async fn spread_leaders(store: &NatsStore, streams: &[stream::Stream]) {
    let mut leaders: Vec<(String, String, BTreeSet<String>)> = Vec::new();
    for stream in streams {
        let Ok(info) = stream.get_info().await else {
            return;
        };
        let Some(cluster) = info.cluster else {
            return;
        };
        let Some(leader) = cluster.leader else {
            return;
        };
        let followers = cluster
            .replicas
            .into_iter()
            .filter(|peer| peer.current && !peer.offline)
            .map(|peer| peer.name)
            .collect();
        leaders.push((info.config.name, leader, followers));
    }
    let moves = plan_moves(&leaders);
    if moves.is_empty() {
        return;
    }
    for (name, to) in &moves {
        let request = serde_json::json!({ "placement": { "preferred": to } }).to_string();
        let answer = store
            .client()
            .request(
                format!("$JS.API.STREAM.LEADER.STEPDOWN.{name}"),
                request.into(),
            )
            .await;
        match answer {
            Ok(reply) => {
                let reply: serde_json::Value =
                    serde_json::from_slice(&reply.payload).unwrap_or_default();
                if reply["success"] != true {
                    tracing::warn!(stream = %name, to = %to, %reply, "could not move a telemetry stream's leader");
                } else {
                    tracing::info!(stream = %name, to = %to, "moved a telemetry stream's leader");
                }
            }
            Err(err) => {
                tracing::warn!(stream = %name, error = %err, "could not move a telemetry stream's leader")
            }
        }
    }
    // Writable again before the hub says it is ready.
    let deadline = tokio::time::Instant::now() + LEADER_WAIT;
    for stream in streams {
        while stream
            .get_info()
            .await
            .ok()
            .and_then(|info| info.cluster?.leader)
            .is_none()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Which streams to move to which node so that leadership counts differ by at most
/// one: `leaders` holds (stream, its leader, its current followers). A stream moves
/// only to one of its own current followers.
fn plan_moves(leaders: &[(String, String, BTreeSet<String>)]) -> Vec<(String, String)> {
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, leader, followers) in leaders {
        *count.entry(leader).or_default() += 1;
        for follower in followers {
            count.entry(follower).or_default();
        }
    }
    let mut current: Vec<(&str, &str, &BTreeSet<String>)> = leaders
        .iter()
        .map(|(name, leader, followers)| (name.as_str(), leader.as_str(), followers))
        .collect();
    let mut moves = Vec::new();
    // Each move lowers the spread; a bound anyway.
    for _ in 0..leaders.len() {
        let Some((&busiest, &most)) = count.iter().max_by_key(|(_, n)| **n) else {
            break;
        };
        let candidate = current.iter_mut().find_map(|(name, leader, followers)| {
            if *leader != busiest {
                return None;
            }
            let (to, fewest) = followers
                .iter()
                .map(|f| (f.as_str(), count.get(f.as_str()).copied().unwrap_or(0)))
                .min_by_key(|(_, n)| *n)?;
            (fewest + 1 < most).then(|| {
                *leader = to;
                (*name, to)
            })
        });
        let Some((name, to)) = candidate else {
            break;
        };
        *count.entry(busiest).or_default() -= 1;
        *count.entry(to).or_default() += 1;
        moves.push((name.to_string(), to.to_string()));
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streams(leaders: &[&str]) -> Vec<(String, String, BTreeSet<String>)> {
        let nodes = ["n0", "n1", "n2"];
        leaders
            .iter()
            .enumerate()
            .map(|(p, leader)| {
                let followers = nodes
                    .iter()
                    .filter(|n| *n != leader)
                    .map(|n| n.to_string())
                    .collect();
                (stream_name(p as u32), leader.to_string(), followers)
            })
            .collect()
    }

    fn spread_after(leaders: &[&str]) -> Vec<usize> {
        let mut now: BTreeMap<String, String> = streams(leaders)
            .into_iter()
            .map(|(name, leader, _)| (name, leader))
            .collect();
        for (name, to) in plan_moves(&streams(leaders)) {
            now.insert(name, to);
        }
        let mut counts: BTreeMap<String, usize> = ["n0", "n1", "n2"]
            .iter()
            .map(|n| (n.to_string(), 0))
            .collect();
        for leader in now.values() {
            *counts.entry(leader.clone()).or_default() += 1;
        }
        let mut counts: Vec<usize> = counts.into_values().collect();
        counts.sort_unstable();
        counts
    }

    #[test]
    fn leaders_on_one_node_are_spread_over_all() {
        assert_eq!(spread_after(&["n0", "n0", "n0", "n0"]), [1, 1, 2]);
        assert_eq!(spread_after(&["n1", "n1", "n2", "n2"]), [1, 1, 2]);
        assert_eq!(spread_after(&["n0", "n0", "n0"]), [1, 1, 1]);
        assert_eq!(spread_after(&["n2"; 8]), [2, 3, 3]);
    }

    #[test]
    fn spread_leaders_stay_where_they_are() {
        assert!(plan_moves(&streams(&["n0", "n1", "n2", "n0"])).is_empty());
        assert!(plan_moves(&streams(&["n0"])).is_empty());
        assert!(plan_moves(&[]).is_empty());
    }

    #[test]
    fn a_leader_moves_only_to_a_current_follower_of_its_stream() {
        let mut leaders = streams(&["n0", "n0", "n0"]);
        for (_, _, followers) in &mut leaders {
            followers.remove("n2");
        }
        let moves = plan_moves(&leaders);
        assert!(moves.iter().all(|(_, to)| to == "n1"), "{moves:?}");
        assert_eq!(moves.len(), 1);
    }

    #[test]
    fn partition_streams_keep_the_readers_subjects() {
        assert_eq!(subject(3), "telemetry.3");
        assert_eq!(stream_name(3), "telemetry-3");
    }
}
