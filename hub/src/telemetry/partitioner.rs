//! Which partition a device's telemetry goes to: a stable hash (64-bit FNV-1a, fixed
//! here so it never changes with a library upgrade) of the device id, modulo the
//! partition count. One device always maps to one partition, which keeps its
//! messages in order.

/// Maps device ids to partitions.
#[derive(Debug, Clone, Copy)]
pub struct Partitioner {
    count: u32,
}

impl Partitioner {
    /// A partitioner over `count` (≥ 1) partitions.
    pub fn new(count: u32) -> Self {
        Self {
            count: count.max(1),
        }
    }

    /// Number of partitions.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The partition of `device_id`.
    pub fn partition(&self, device_id: &str) -> u32 {
        const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let hash = device_id.bytes().fold(OFFSET_BASIS, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(PRIME)
        });
        (hash % u64::from(self.count)) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mapping_is_stable_and_spreads_devices() {
        let p = Partitioner::new(4);
        // Fixed values: changing them would move devices between partitions.
        assert_eq!(
            p.partition("device-1"),
            Partitioner::new(4).partition("device-1")
        );
        assert_eq!(p.partition(""), (0xcbf2_9ce4_8422_2325u64 % 4) as u32);
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[p.partition(&format!("sensor-{i}")) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }
}
