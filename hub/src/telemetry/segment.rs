//! One partition's log on disk: append-only segment files of framed records, each
//! with a CRC, and an in-memory sparse offset index. On open the last segment is
//! checked record by record and a torn tail (a crash mid-write) is cut off.
//!
//! ```text
//! DIR/telemetry/p{N}/{base offset, 20 digits}.log
//! record = len: u32 | crc32(offset, time, payload): u32 | offset: u64 | time: i64 | payload
//! ```
//!
//! The writer (one thread per partition, see [`super::appender`]) appends a batch
//! with one write and one `fdatasync`, and only then publishes the new end, so
//! readers never see a record that is not durable.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

/// Bytes before the payload in every record.
pub const HEADER_LEN: usize = 4 + 4 + 8 + 8;
/// A sparse index entry every this many bytes of a segment.
const INDEX_INTERVAL: u64 = 16 * 1024;
/// Largest record payload accepted (a telemetry message plus its metadata).
pub const MAX_PAYLOAD: usize = 4 * 1024 * 1024;

/// A stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Position in the partition, from 0.
    pub offset: u64,
    /// Enqueued time, Unix nanoseconds.
    pub time: i64,
    /// The encoded message.
    pub payload: Bytes,
}

/// Failures of a partition log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// File I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The requested offset was removed by retention.
    #[error("offset {requested} is before the first available offset {first}")]
    BeforeRetention {
        /// What was asked for.
        requested: u64,
        /// The first offset still stored.
        first: u64,
    },
    /// A sealed segment does not parse (not a torn tail: real corruption).
    #[error("corrupt segment {path} at byte {position}")]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Where parsing failed.
        position: u64,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug)]
struct Segment {
    base: u64,
    path: PathBuf,
    file: Arc<File>,
    /// Bytes of complete records.
    size: u64,
    /// One past the last offset in the segment.
    end: u64,
    /// (offset, byte position) every [`INDEX_INTERVAL`] bytes; first entry (base, 0).
    index: Vec<(u64, u64)>,
    /// Latest record time in the segment (for retention by age).
    newest: i64,
}

impl Segment {
    fn position_of(&self, offset: u64) -> u64 {
        match self.index.binary_search_by_key(&offset, |(o, _)| *o) {
            Ok(i) => self.index[i].1,
            Err(0) => 0,
            Err(i) => self.index[i - 1].1,
        }
    }

    fn note(&mut self, offset: u64, position: u64, time: i64, record_len: u64) {
        let last_indexed = self.index.last().map_or(0, |(_, p)| *p);
        if self.index.is_empty() || position - last_indexed >= INDEX_INTERVAL {
            self.index.push((offset, position));
        }
        self.size = position + record_len;
        self.end = offset + 1;
        self.newest = self.newest.max(time);
    }
}

/// Frames one record into `out`.
pub fn encode_record(out: &mut Vec<u8>, offset: u64, time: i64, payload: &[u8]) {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&offset.to_le_bytes());
    crc.update(&time.to_le_bytes());
    crc.update(payload);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&time.to_le_bytes());
    out.extend_from_slice(payload);
}

/// Parses the record at the start of `buf`: `Some((record, length))` when whole and
/// its CRC matches, `None` when incomplete or damaged.
fn decode_record(buf: &[u8]) -> Option<(Record, usize)> {
    let header = buf.get(..HEADER_LEN)?;
    let len = u32::from_le_bytes(header[0..4].try_into().ok()?) as usize;
    if len > MAX_PAYLOAD {
        return None;
    }
    let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
    let offset = u64::from_le_bytes(header[8..16].try_into().ok()?);
    let time = i64::from_le_bytes(header[16..24].try_into().ok()?);
    let payload = buf.get(HEADER_LEN..HEADER_LEN + len)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&offset.to_le_bytes());
    hasher.update(&time.to_le_bytes());
    hasher.update(payload);
    if hasher.finalize() != crc {
        return None;
    }
    Some((
        Record {
            offset,
            time,
            payload: Bytes::copy_from_slice(payload),
        },
        HEADER_LEN + len,
    ))
}

/// A partition's segments, shared by its writer and its readers.
#[derive(Debug)]
pub struct SegmentLog {
    dir: PathBuf,
    segments: BTreeMap<u64, Segment>,
    /// Writable handle of the last segment.
    active: File,
    segment_bytes: u64,
}

impl SegmentLog {
    /// Opens (or creates) the log in `dir`, recovering a torn tail of the last
    /// segment. Segments roll over at `segment_bytes`.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<Self, LogError> {
        crate::data_dir::create_private_dir_all(dir).map_err(io_err(dir))?;
        let mut bases: Vec<u64> = fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                name.strip_suffix(".log")?.parse().ok()
            })
            .collect();
        bases.sort_unstable();
        if bases.is_empty() {
            bases.push(0);
        }
        let last = bases.last().copied().unwrap_or(0);
        let mut segments = BTreeMap::new();
        for base in &bases {
            let segment = Self::load_segment(dir, *base, *base == last)?;
            segments.insert(*base, segment);
        }
        let active_path = segment_path(dir, last);
        let active = OpenOptions::new()
            .append(true)
            .open(&active_path)
            .map_err(io_err(&active_path))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            segments,
            active,
            segment_bytes,
        })
    }

    /// Reads a segment's records to build its index; in the `last` segment a damaged
    /// or incomplete tail is truncated (it was never acknowledged).
    fn load_segment(dir: &Path, base: u64, last: bool) -> Result<Segment, LogError> {
        let path = segment_path(dir, base);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(crate::data_dir::PRIVATE_FILE_MODE)
            .open(&path)
            .map_err(io_err(&path))?;
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        let mut segment = Segment {
            base,
            path: path.clone(),
            file: Arc::new(file),
            size: 0,
            end: base,
            index: Vec::new(),
            newest: i64::MIN,
        };
        let mut position = 0usize;
        while position < bytes.len() {
            match decode_record(&bytes[position..]) {
                Some((record, len)) if record.offset == segment.end => {
                    segment.note(record.offset, position as u64, record.time, len as u64);
                    position += len;
                }
                _ if last => {
                    tracing::warn!(
                        path = %path.display(),
                        kept = position,
                        dropped = bytes.len() - position,
                        "truncating a torn tail left by a crash"
                    );
                    segment
                        .file
                        .set_len(position as u64)
                        .map_err(io_err(&path))?;
                    segment.file.sync_all().map_err(io_err(&path))?;
                    break;
                }
                _ => {
                    return Err(LogError::Corrupt {
                        path,
                        position: position as u64,
                    });
                }
            }
        }
        Ok(segment)
    }

    /// The first offset still stored.
    pub fn first_offset(&self) -> u64 {
        self.segments.values().next().map_or(0, |s| s.base)
    }

    /// One past the last durable offset (the next offset to be written).
    pub fn end_offset(&self) -> u64 {
        self.segments.values().next_back().map_or(0, |s| s.end)
    }

    /// Bytes stored in all segments.
    pub fn total_bytes(&self) -> u64 {
        self.segments.values().map(|s| s.size).sum()
    }

    /// Appends a batch of (time, payload) with one write and one `fdatasync`;
    /// returns the offset of the first. On failure nothing of the batch remains.
    pub fn append(&mut self, batch: &[(i64, Bytes)]) -> Result<u64, LogError> {
        let first = self.end_offset();
        let Some(active) = self.segments.values_mut().next_back() else {
            return Err(LogError::Corrupt {
                path: self.dir.clone(),
                position: 0,
            });
        };
        let start = active.size;
        let mut buf = Vec::with_capacity(batch.iter().map(|(_, p)| HEADER_LEN + p.len()).sum());
        let mut placed = Vec::with_capacity(batch.len());
        for (i, (time, payload)) in batch.iter().enumerate() {
            let position = start + buf.len() as u64;
            encode_record(&mut buf, first + i as u64, *time, payload);
            placed.push((position, *time, (HEADER_LEN + payload.len()) as u64));
        }
        let written = self
            .active
            .write_all(&buf)
            .and_then(|()| self.active.sync_data());
        if let Err(source) = written {
            // Cut back whatever part of the batch reached the file; if even that
            // fails, the tail is torn and recovery on the next open removes it.
            let _ = self.active.set_len(start);
            return Err(LogError::Io {
                path: active.path.clone(),
                source,
            });
        }
        for (i, (position, time, len)) in placed.into_iter().enumerate() {
            active.note(first + i as u64, position, time, len);
        }
        if active.size >= self.segment_bytes {
            self.roll()?;
        }
        Ok(first)
    }

    /// Starts a new segment at the current end.
    fn roll(&mut self) -> Result<(), LogError> {
        let base = self.end_offset();
        let path = segment_path(&self.dir, base);
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(crate::data_dir::PRIVATE_FILE_MODE)
            .open(&path)
            .map_err(io_err(&path))?;
        // The new file's directory entry must survive a crash too.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))?;
        let reader = File::open(&path).map_err(io_err(&path))?;
        self.active = file;
        self.segments.insert(
            base,
            Segment {
                base,
                path,
                file: Arc::new(reader),
                size: 0,
                end: base,
                index: Vec::new(),
                newest: i64::MIN,
            },
        );
        Ok(())
    }

    /// Up to `max` records from `from`, at most about `max_bytes` of payload.
    pub fn read(&self, from: u64, max: usize, max_bytes: usize) -> Result<Vec<Record>, LogError> {
        let first = self.first_offset();
        if from < first {
            return Err(LogError::BeforeRetention {
                requested: from,
                first,
            });
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut next = from;
        for segment in self
            .segments
            .range(..=from)
            .next_back()
            .into_iter()
            .map(|(_, s)| s)
            .chain(
                self.segments
                    .range(from.saturating_add(1)..)
                    .map(|(_, s)| s),
            )
        {
            if next >= segment.end {
                continue;
            }
            let mut position = segment.position_of(next);
            let mut chunk = Vec::new();
            while position < segment.size && out.len() < max && bytes < max_bytes {
                let want = (segment.size - position).min(256 * 1024) as usize;
                chunk.resize(want, 0);
                segment
                    .file
                    .read_exact_at(&mut chunk, position)
                    .map_err(io_err(&segment.path))?;
                let mut at = 0usize;
                while at < chunk.len() {
                    let Some((record, len)) = decode_record(&chunk[at..]) else {
                        break;
                    };
                    at += len;
                    if record.offset < next {
                        continue;
                    }
                    bytes += record.payload.len();
                    next = record.offset + 1;
                    out.push(record);
                    if out.len() >= max || bytes >= max_bytes {
                        break;
                    }
                }
                if at == 0 {
                    // A record larger than the chunk: read exactly it.
                    let mut header = [0u8; HEADER_LEN];
                    segment
                        .file
                        .read_exact_at(&mut header, position)
                        .map_err(io_err(&segment.path))?;
                    let len =
                        u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
                    if len > MAX_PAYLOAD || HEADER_LEN + len <= chunk.len() {
                        return Err(LogError::Corrupt {
                            path: segment.path.clone(),
                            position,
                        });
                    }
                    chunk.resize(HEADER_LEN + len, 0);
                    segment
                        .file
                        .read_exact_at(&mut chunk, position)
                        .map_err(io_err(&segment.path))?;
                    let Some((record, len)) = decode_record(&chunk) else {
                        return Err(LogError::Corrupt {
                            path: segment.path.clone(),
                            position,
                        });
                    };
                    position += len as u64;
                    if record.offset >= next {
                        bytes += record.payload.len();
                        next = record.offset + 1;
                        out.push(record);
                    }
                    continue;
                }
                position += at as u64;
            }
            if out.len() >= max || bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Deletes sealed segments whose newest record is older than `older_than`
    /// (Unix nanoseconds), then the oldest sealed ones while more than `max_bytes`
    /// are stored. The active segment is never deleted. Returns how many went.
    pub fn apply_retention(&mut self, older_than: i64, max_bytes: u64) -> Result<usize, LogError> {
        let mut removed = 0;
        loop {
            if self.segments.len() <= 1 {
                break;
            }
            let total = self.total_bytes();
            let Some((&base, oldest)) = self.segments.iter().next() else {
                break;
            };
            let expired = oldest.newest < older_than;
            if !expired && total <= max_bytes {
                break;
            }
            let path = oldest.path.clone();
            self.segments.remove(&base);
            fs::remove_file(&path).map_err(io_err(&path))?;
            removed += 1;
        }
        Ok(removed)
    }
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: usize, size: usize, time: i64) -> Vec<(i64, Bytes)> {
        (0..n)
            .map(|i| (time, Bytes::from(vec![i as u8; size])))
            .collect()
    }

    #[test]
    fn appended_records_read_back_in_order_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(dir.path(), 4096).unwrap();
        let mut expected = 0u64;
        for round in 0..20 {
            let first = log.append(&batch(7, 100 + round, 1)).unwrap();
            assert_eq!(first, expected);
            expected += 7;
        }
        assert!(log.segments.len() > 3, "rolled over");
        let all = log.read(0, 1000, usize::MAX).unwrap();
        assert_eq!(all.len(), 140);
        assert!(all.iter().enumerate().all(|(i, r)| r.offset == i as u64));
        let middle = log.read(57, 10, usize::MAX).unwrap();
        assert_eq!(middle.first().map(|r| r.offset), Some(57));
        assert_eq!(middle.len(), 10);
        assert!(log.read(140, 10, usize::MAX).unwrap().is_empty());
    }

    #[test]
    fn a_reopened_log_continues_where_it_ended() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = SegmentLog::open(dir.path(), 1 << 20).unwrap();
            log.append(&batch(5, 10, 1)).unwrap();
        }
        let mut log = SegmentLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(log.end_offset(), 5);
        assert_eq!(log.append(&batch(1, 10, 1)).unwrap(), 5);
        assert_eq!(log.read(0, 100, usize::MAX).unwrap().len(), 6);
    }

    #[test]
    fn a_torn_tail_is_cut_off_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = SegmentLog::open(dir.path(), 1 << 20).unwrap();
            log.append(&batch(3, 50, 1)).unwrap();
        }
        let path = segment_path(dir.path(), 0);
        let good_len = fs::metadata(&path).unwrap().len();
        // Half a record, as a crash mid-write leaves it.
        let mut partial = Vec::new();
        encode_record(&mut partial, 3, 1, &[9u8; 50]);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&partial[..30]).unwrap();
        drop(file);

        let mut log = SegmentLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(log.end_offset(), 3);
        assert_eq!(fs::metadata(&path).unwrap().len(), good_len);
        assert_eq!(log.append(&batch(1, 50, 1)).unwrap(), 3);
        assert_eq!(log.read(0, 10, usize::MAX).unwrap().len(), 4);
    }

    #[test]
    fn a_flipped_bit_in_the_last_record_is_treated_as_torn() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = SegmentLog::open(dir.path(), 1 << 20).unwrap();
            log.append(&batch(2, 50, 1)).unwrap();
        }
        let path = segment_path(dir.path(), 0);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let log = SegmentLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            log.end_offset(),
            1,
            "the damaged record is dropped, the first kept"
        );
    }

    #[test]
    fn retention_drops_old_and_excess_segments_but_never_the_active_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(dir.path(), 1000).unwrap();
        for time in 0..10 {
            log.append(&batch(1, 1000, time)).unwrap();
        }
        assert_eq!(log.segments.len(), 11);
        // Everything older than time 5 goes.
        assert_eq!(log.apply_retention(5, u64::MAX).unwrap(), 5);
        assert_eq!(log.first_offset(), 5);
        assert!(matches!(
            log.read(2, 10, usize::MAX),
            Err(LogError::BeforeRetention {
                requested: 2,
                first: 5
            })
        ));
        // Size: keep at most ~2 segments.
        log.apply_retention(i64::MIN, 2100).unwrap();
        assert_eq!(log.first_offset(), 8);
        log.apply_retention(i64::MAX, 0).unwrap();
        assert_eq!(log.segments.len(), 1, "the active segment stays");
        assert_eq!(log.end_offset(), 10);
    }

    #[test]
    fn large_records_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(dir.path(), 1 << 30).unwrap();
        log.append(&batch(3, 300 * 1024, 1)).unwrap();
        let records = log.read(0, 10, usize::MAX).unwrap();
        assert_eq!(records.len(), 3);
        assert!(records.iter().all(|r| r.payload.len() == 300 * 1024));
    }
}
