//! The persisted index of one segment file: what walking the segment would find
//! (its sparse offset index, end, newest time and damaged ranges), written beside it
//! once it is sealed so that opening a partition does not read its retained records.
//!
//! ```text
//! DIR/telemetry/p{N}/{base offset, 20 digits}.idx
//! index = "HUBIDX01" | base u64 | file_len u64 | size u64 | end u64 | newest i64
//!         | entries u32 | holes u32 | (offset u64, position u64) × entries
//!         | (start u64, end u64) × holes | crc32(everything before) u32
//! ```
//!
//! An index is trusted only when its checksum matches, it names the segment's base,
//! and the segment file still has the length it had when the index was written; a
//! torn, damaged, stale or missing index makes the caller walk that one segment
//! again. Integers are little-endian.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"HUBIDX01";
/// Magic, five u64 fields, two u32 counts.
const FIXED_LEN: usize = 8 + 5 * 8 + 2 * 4;
/// Most entries (or holes) an index may claim: far more than a segment of the
/// largest configurable size can hold, and a bound on what a damaged count can make
/// the decoder allocate.
const MAX_ENTRIES: usize = 1 << 24;

/// What walking a segment found, as stored in its index file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentIndex {
    /// The segment's first offset (its file name).
    pub base: u64,
    /// The segment file's length when the index was written.
    pub file_len: u64,
    /// Bytes of complete records (less than `file_len` when the end is damaged).
    pub size: u64,
    /// One past the last offset.
    pub end: u64,
    /// Latest record time (Unix nanoseconds; `i64::MIN` when empty).
    pub newest: i64,
    /// (offset, byte position), ascending.
    pub entries: Vec<(u64, u64)>,
    /// Damaged byte ranges (start → end) that reads skip.
    pub holes: BTreeMap<u64, u64>,
}

/// Why a stored index was not used.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The file could not be read (including: it does not exist).
    #[error("{path}: {source}")]
    Io {
        /// The index file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Torn or damaged: too short, a wrong magic or count, or a checksum mismatch.
    #[error("{path}: damaged index ({reason})")]
    Damaged {
        /// The index file.
        path: PathBuf,
        /// What did not match.
        reason: &'static str,
    },
    /// Whole, but not for the segment as it is now (another base, another length).
    #[error("{path}: index does not describe the segment as it is now ({reason})")]
    Stale {
        /// The index file.
        path: PathBuf,
        /// What differs.
        reason: &'static str,
    },
}

/// The index file of the segment starting at `base` in `dir`.
pub fn index_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.idx"))
}

impl SegmentIndex {
    /// The stored form, checksum last.
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(FIXED_LEN + 16 * (self.entries.len() + self.holes.len()) + 4);
        out.extend_from_slice(MAGIC);
        for field in [self.base, self.file_len, self.size, self.end] {
            out.extend_from_slice(&field.to_le_bytes());
        }
        out.extend_from_slice(&self.newest.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.holes.len() as u32).to_le_bytes());
        for (a, b) in self
            .entries
            .iter()
            .copied()
            .chain(self.holes.iter().map(|(&a, &b)| (a, b)))
        {
            out.extend_from_slice(&a.to_le_bytes());
            out.extend_from_slice(&b.to_le_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses a stored index; the error names what is damaged.
    pub fn decode(bytes: &[u8]) -> Result<Self, &'static str> {
        let (body, crc) = bytes
            .split_last_chunk::<4>()
            .ok_or("shorter than its checksum")?;
        if body.len() < FIXED_LEN {
            return Err("shorter than its header");
        }
        if crc32fast::hash(body) != u32::from_le_bytes(*crc) {
            return Err("checksum mismatch");
        }
        let (magic, mut rest) = body.split_at(MAGIC.len());
        if magic != MAGIC {
            return Err("not an index of this format");
        }
        let mut u64_at = || -> Result<u64, &'static str> {
            let (field, tail) = rest.split_first_chunk::<8>().ok_or("truncated")?;
            rest = tail;
            Ok(u64::from_le_bytes(*field))
        };
        let base = u64_at()?;
        let file_len = u64_at()?;
        let size = u64_at()?;
        let end = u64_at()?;
        let newest = u64_at()? as i64;
        let (counts, mut pairs) = rest.split_first_chunk::<8>().ok_or("truncated")?;
        let entries = u32::from_le_bytes([counts[0], counts[1], counts[2], counts[3]]) as usize;
        let holes = u32::from_le_bytes([counts[4], counts[5], counts[6], counts[7]]) as usize;
        if entries > MAX_ENTRIES || holes > MAX_ENTRIES || pairs.len() != 16 * (entries + holes) {
            return Err("counts do not match the length");
        }
        let mut pair = || {
            let (a, tail) = pairs.split_first_chunk::<8>()?;
            let (b, tail) = tail.split_first_chunk::<8>()?;
            pairs = tail;
            Some((u64::from_le_bytes(*a), u64::from_le_bytes(*b)))
        };
        let entries: Vec<(u64, u64)> = (0..entries).map_while(|_| pair()).collect();
        let holes: BTreeMap<u64, u64> = (0..holes).map_while(|_| pair()).collect();
        let index = Self {
            base,
            file_len,
            size,
            end,
            newest,
            entries,
            holes,
        };
        index.check_shape()?;
        Ok(index)
    }

    /// Rejects an index a correct writer never produces (a checksum only says the
    /// bytes are the ones written).
    fn check_shape(&self) -> Result<(), &'static str> {
        let ascending = self
            .entries
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1);
        let inside = self.entries.iter().all(|&(offset, position)| {
            offset >= self.base && offset < self.end && position < self.size
        });
        let holes_inside = self
            .holes
            .iter()
            .all(|(&start, &end)| start < end && end <= self.file_len);
        if self.size > self.file_len
            || self.end < self.base
            || !ascending
            || !inside
            || !holes_inside
        {
            return Err("fields out of range");
        }
        Ok(())
    }

    /// Reads the index of the segment at `base` in `dir` and checks it against the
    /// segment file's current length `file_len`: equal for a sealed segment; for the
    /// last one (`prefix`) the index may describe a prefix of the file (appends
    /// followed it), whole records up to its recorded length.
    pub fn load(dir: &Path, base: u64, file_len: u64, prefix: bool) -> Result<Self, IndexError> {
        let path = index_path(dir, base);
        let bytes = fs::read(&path).map_err(|source| IndexError::Io {
            path: path.clone(),
            source,
        })?;
        let index = Self::decode(&bytes).map_err(|reason| IndexError::Damaged {
            path: path.clone(),
            reason,
        })?;
        if index.base != base {
            return Err(IndexError::Stale {
                path,
                reason: "another segment's base",
            });
        }
        let fits = if prefix {
            index.size == index.file_len && index.file_len <= file_len
        } else {
            index.file_len == file_len
        };
        if !fits {
            return Err(IndexError::Stale {
                path,
                reason: "the segment's length changed",
            });
        }
        Ok(index)
    }

    /// Writes the index beside its segment: to a temporary file renamed over the
    /// index, so a reader finds the old index, the new one, or none. Not synced: an
    /// index lost or torn by a crash is found out by its checksum and rebuilt by
    /// walking the segment, so it never needs to be durable.
    pub fn store(&self, dir: &Path) -> io::Result<()> {
        let path = index_path(dir, self.base);
        let tmp = path.with_extension("idx.tmp");
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(crate::data_dir::PRIVATE_FILE_MODE)
            .open(&tmp)?;
        file.write_all(&self.encode())?;
        drop(file);
        fs::rename(&tmp, &path)
    }
}

/// Removes the index of the segment at `base`, if there is one.
pub fn remove(dir: &Path, base: u64) -> io::Result<()> {
    match fs::remove_file(index_path(dir, base)) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SegmentIndex {
        SegmentIndex {
            base: 100,
            file_len: 70_000,
            size: 65_000,
            end: 180,
            newest: 1_700_000_000_000_000_000,
            entries: vec![(100, 0), (130, 16_500), (160, 33_000)],
            holes: BTreeMap::from([(40_000, 40_200)]),
        }
    }

    #[test]
    fn an_index_reads_back_as_written() {
        let index = sample();
        assert_eq!(SegmentIndex::decode(&index.encode()), Ok(index));
        let empty = SegmentIndex {
            base: 7,
            file_len: 0,
            size: 0,
            end: 7,
            newest: i64::MIN,
            entries: Vec::new(),
            holes: BTreeMap::new(),
        };
        assert_eq!(SegmentIndex::decode(&empty.encode()), Ok(empty));
    }

    #[test]
    fn every_flipped_bit_and_every_truncation_is_refused() {
        let bytes = sample().encode();
        for at in 0..bytes.len() {
            for bit in 0..8 {
                let mut damaged = bytes.clone();
                damaged[at] ^= 1 << bit;
                assert!(
                    SegmentIndex::decode(&damaged).is_err(),
                    "bit {bit} of byte {at}"
                );
            }
            assert!(SegmentIndex::decode(&bytes[..at]).is_err(), "cut at {at}");
        }
    }

    #[test]
    fn a_checksummed_index_with_impossible_fields_is_refused() {
        let mut index = sample();
        index.entries.push((150, 50_000));
        assert!(
            SegmentIndex::decode(&index.encode()).is_err(),
            "not ascending"
        );
        let mut index = sample();
        index.size = index.file_len + 1;
        assert!(
            SegmentIndex::decode(&index.encode()).is_err(),
            "size past the file"
        );
    }

    #[test]
    fn load_refuses_a_missing_damaged_or_stale_index() {
        let dir = tempfile::tempdir().unwrap();
        let index = sample();
        assert!(matches!(
            SegmentIndex::load(dir.path(), 100, 70_000, false),
            Err(IndexError::Io { .. })
        ));
        index.store(dir.path()).unwrap();
        assert_eq!(
            SegmentIndex::load(dir.path(), 100, 70_000, false).unwrap(),
            index
        );
        assert!(matches!(
            SegmentIndex::load(dir.path(), 100, 70_001, false),
            Err(IndexError::Stale { .. })
        ));
        // The last segment's index may cover a prefix of whole records only.
        assert!(matches!(
            SegmentIndex::load(dir.path(), 100, 70_001, true),
            Err(IndexError::Stale { .. })
        ));
        let prefix = SegmentIndex {
            file_len: 65_000,
            ..index.clone()
        };
        prefix.store(dir.path()).unwrap();
        assert_eq!(
            SegmentIndex::load(dir.path(), 100, 70_000, true).unwrap(),
            prefix
        );
        assert!(matches!(
            SegmentIndex::load(dir.path(), 100, 64_999, true),
            Err(IndexError::Stale { .. })
        ));
        index.store(dir.path()).unwrap();
        fs::rename(index_path(dir.path(), 100), index_path(dir.path(), 5)).unwrap();
        assert!(matches!(
            SegmentIndex::load(dir.path(), 5, 70_000, false),
            Err(IndexError::Stale { .. })
        ));
        let path = index_path(dir.path(), 5);
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(
            SegmentIndex::load(dir.path(), 5, 70_000, false),
            Err(IndexError::Damaged { .. })
        ));
        remove(dir.path(), 5).unwrap();
        remove(dir.path(), 5).unwrap();
        assert!(!path.exists());
    }
}
