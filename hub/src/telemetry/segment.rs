//! One partition's log on disk: append-only segment files of framed records, each
//! with a CRC, and an in-memory sparse offset index. A sealed segment's index is
//! persisted beside it ([`super::segment_index`]) when the next segment starts, so
//! opening a partition reads one small index file per sealed segment instead of its
//! records. A segment without a usable index (missing, torn, damaged, stale) is
//! checked record by record, as is the last segment after a crash: a torn tail of the
//! last one (a crash mid-write) is cut off; a damaged record with valid records after
//! it (a bad sector, a flipped bit) is skipped as a hole, and the records after it
//! are kept (see `walk_segment`). Damage that appears in a segment after its index
//! was written is found by the read that meets it and skipped the same way.
//!
//! ```text
//! DIR/telemetry/p{N}/{base offset, 20 digits}.log
//! DIR/telemetry/p{N}/{base offset, 20 digits}.idx   (see segment_index)
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
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

use super::segment_index::{self, IndexError, SegmentIndex};

/// Bytes before the payload in every record.
pub const HEADER_LEN: usize = 4 + 4 + 8 + 8;
/// A sparse index entry every this many bytes of a segment.
const INDEX_INTERVAL: u64 = 16 * 1024;
/// Largest record payload accepted (a telemetry message plus its metadata): the
/// record size the configuration's ceilings are derived from.
pub const MAX_PAYLOAD: usize = crate::config::MAX_TELEMETRY_RECORD_BYTES;

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
    /// A record larger than the format allows ([`MAX_PAYLOAD`]); nothing was written.
    #[error("record of {len} bytes exceeds the segment limit of {MAX_PAYLOAD} bytes")]
    TooLarge {
        /// The payload's length.
        len: usize,
    },
    /// A write failed and cutting the file back to its last durable record failed
    /// too: appending after the garbage would corrupt the log, so the partition
    /// refuses every append until the hub restarts (recovery then cuts the tail).
    #[error("partition stopped: {path} could not be cut back after a failed write: {reason}")]
    Stopped {
        /// The partition's directory.
        path: PathBuf,
        /// The cut-back's error.
        reason: String,
    },
    /// A segment does not parse where it must.
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
    /// Damaged byte ranges (start → end), skipped by reads: found by a walk on open,
    /// kept in the persisted index, or met by a read (hence the lock: reads share
    /// the log).
    holes: Mutex<BTreeMap<u64, u64>>,
}

impl Segment {
    fn empty(base: u64, path: PathBuf, file: File) -> Self {
        Self {
            base,
            path,
            file: Arc::new(file),
            size: 0,
            end: base,
            index: Vec::new(),
            newest: i64::MIN,
            holes: Mutex::new(BTreeMap::new()),
        }
    }

    /// The segment as its persisted index describes it.
    fn indexed(path: PathBuf, file: File, stored: SegmentIndex) -> Self {
        Self {
            base: stored.base,
            path,
            file: Arc::new(file),
            size: stored.size,
            end: stored.end,
            index: stored.entries,
            newest: stored.newest,
            holes: Mutex::new(stored.holes),
        }
    }

    /// What to persist about this segment, whose file is `file_len` bytes long.
    fn to_index(&self, file_len: u64) -> SegmentIndex {
        SegmentIndex {
            base: self.base,
            file_len,
            size: self.size,
            end: self.end,
            newest: self.newest,
            entries: self.index.clone(),
            holes: self.holes().clone(),
        }
    }

    fn holes(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, u64>> {
        self.holes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The indexed (offset, byte position) at or before `offset`: where a read of
    /// `offset` starts, and the offset of the record there.
    fn entry_for(&self, offset: u64) -> (u64, u64) {
        match self.index.binary_search_by_key(&offset, |(o, _)| *o) {
            Ok(i) => self.index[i],
            Err(0) => (self.base, 0),
            Err(i) => self.index[i - 1],
        }
    }

    /// Persists this segment's index, for the file's current length. A failure
    /// costs only a walk of the segment at the next open, so it is logged, not
    /// returned.
    fn store_index(&self, dir: &Path) {
        let stored = self
            .file
            .metadata()
            .and_then(|meta| self.to_index(meta.len()).store(dir));
        if let Err(err) = stored {
            tracing::warn!(
                path = %self.path.display(),
                error = %err,
                "cannot write a segment's index; the next start reads the segment instead"
            );
        }
    }

    /// The whole, CRC-valid record at `position` if it ends by `limit` (read on
    /// its own: it may be larger than a read's chunk).
    fn whole_record_at(
        &self,
        position: u64,
        limit: u64,
    ) -> Result<Option<(Record, usize)>, LogError> {
        let mut header = [0u8; HEADER_LEN];
        if position + HEADER_LEN as u64 > limit {
            return Ok(None);
        }
        self.file
            .read_exact_at(&mut header, position)
            .map_err(io_err(&self.path))?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len > MAX_PAYLOAD || position + (HEADER_LEN + len) as u64 > limit {
            return Ok(None);
        }
        let mut whole = vec![0u8; HEADER_LEN + len];
        self.file
            .read_exact_at(&mut whole, position)
            .map_err(io_err(&self.path))?;
        Ok(decode_record(&whole))
    }

    /// Skips damage met by a read at `position` (not a known hole): finds the next
    /// whole record before `limit` whose offset could follow `expected` (see
    /// [`resync`]), records the damaged range as a hole and returns where reading
    /// goes on (`limit` when nothing readable follows); always past `position`.
    fn skip_damage(&self, position: u64, limit: u64, expected: u64) -> Result<u64, LogError> {
        let mut rest = vec![0u8; (limit - position) as usize];
        self.file
            .read_exact_at(&mut rest, position)
            .map_err(io_err(&self.path))?;
        let next = resync(&rest, 0, expected).map_or(limit, |at| position + at as u64);
        tracing::error!(
            path = %self.path.display(),
            from = position,
            to = next,
            after_offset = expected,
            "skipping a damaged record found by a read; the records after it are kept"
        );
        self.holes().insert(position, next);
        Ok(next)
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

/// Finds the first position after `from` in `bytes` where a whole, CRC-valid record
/// starts whose offset could follow `expected` (at least `expected`, and no more
/// records ahead than the remaining bytes could hold). Cheap header checks come
/// first, so scanning garbage costs little more than one pass over it.
fn resync(bytes: &[u8], from: usize, expected: u64) -> Option<usize> {
    (from + 1..bytes.len().saturating_sub(HEADER_LEN - 1)).find(|&at| {
        let rest = &bytes[at..];
        let Ok(len) = <[u8; 4]>::try_from(&rest[0..4]).map(u32::from_le_bytes) else {
            return false;
        };
        let Ok(offset) = <[u8; 8]>::try_from(&rest[8..16]).map(u64::from_le_bytes) else {
            return false;
        };
        let most_ahead = (rest.len() / HEADER_LEN) as u64;
        len as usize <= rest.len() - HEADER_LEN
            && offset >= expected
            && offset - expected <= most_ahead
            && decode_record(rest).is_some()
    })
}

/// A partition's segments, shared by its writer and its readers.
#[derive(Debug)]
pub struct SegmentLog {
    dir: PathBuf,
    segments: BTreeMap<u64, Segment>,
    /// Writable handle of the last segment.
    active: File,
    segment_bytes: u64,
    /// Set when a failed write could not be cut back: no append is accepted after it.
    stopped: Option<String>,
    /// Bytes of the active segment its persisted index covered when last written.
    indexed_at: u64,
    #[cfg(test)]
    faults: Faults,
}

/// Failures a test can inject into the file operations of [`SegmentLog::append`].
#[cfg(test)]
#[derive(Debug, Default)]
struct Faults {
    write: bool,
    cut_back: bool,
    roll: bool,
}

impl SegmentLog {
    /// Opens (or creates) the log in `dir`: sealed segments from their persisted
    /// indexes where those are usable, the others (and the last segment after a
    /// crash) by walking their records, recovering a torn tail of the last segment.
    /// Segments roll over at `segment_bytes`.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<Self, LogError> {
        crate::data_dir::create_private_dir_all(dir).map_err(io_err(dir))?;
        let mut bases: Vec<u64> = Vec::new();
        let mut indexes: Vec<u64> = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if let Some(base) = name.strip_suffix(".log").and_then(|b| b.parse().ok()) {
                bases.push(base);
            } else if let Some(base) = name.strip_suffix(".idx").and_then(|b| b.parse().ok()) {
                indexes.push(base);
            }
        }
        bases.sort_unstable();
        if bases.is_empty() {
            bases.push(0);
        }
        // An index whose segment is gone (retention removes the index first, but a
        // crash or an operator may leave one) would only mislead a later segment
        // of that base.
        for base in indexes {
            if bases.binary_search(&base).is_err() {
                segment_index::remove(dir, base).map_err(io_err(dir))?;
            }
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
            stopped: None,
            indexed_at: 0,
            #[cfg(test)]
            faults: Faults::default(),
        })
    }

    /// Loads one segment: from its persisted index when that is usable, otherwise
    /// by walking it ([`Self::walk_segment`]) and, if it is sealed, writing its index
    /// for the next start.
    ///
    /// The `last` segment's index describes a prefix of it: all of it after a clean
    /// shutdown ([`Self::close`]), what had been appended at the last checkpoint
    /// otherwise (see [`SegmentLog::append`]). Only what follows that prefix is
    /// walked, which finds and cuts a torn tail after a crash.
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
        let file_len = file.metadata().map_err(io_err(&path))?.len();
        let usable = match SegmentIndex::load(dir, base, file_len, last) {
            Ok(stored) => Some(stored),
            Err(IndexError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => None,
            Err(err) => {
                tracing::warn!(error = %err, "not using a segment's index; reading the segment instead");
                None
            }
        };
        if let Some(stored) = &usable
            && !stored.holes.is_empty()
        {
            tracing::warn!(
                path = %path.display(),
                holes = stored.holes.len(),
                "segment has damaged records found earlier; reads skip them"
            );
        }
        match usable {
            Some(stored) if !last => Ok(Segment::indexed(path, file, stored)),
            Some(stored) => Self::walk_segment(Segment::indexed(path, file, stored), true),
            None => {
                let segment = Self::walk_segment(Segment::empty(base, path, file), last)?;
                if !last {
                    segment.store_index(dir);
                }
                Ok(segment)
            }
        }
    }

    /// Reads a segment's records to build its index.
    ///
    /// Where a record does not parse, the rest of the file is scanned for the next
    /// whole record with a valid CRC and a plausible offset ([`resync`]). If there is
    /// one, the damaged range is a hole: reads skip it and every record after it is
    /// kept (they were acknowledged; the damaged one is lost, and its offset with it).
    /// If there is none, the damage is a tail: in the `last` segment a torn tail left
    /// by a crash mid-write (never acknowledged), cut off; in a sealed segment,
    /// acknowledged records that can no longer be read, kept out of reads and logged.
    fn walk_segment(mut segment: Segment, last: bool) -> Result<Segment, LogError> {
        let path = segment.path.clone();
        // Walk from the end of what an index already describes (0 without one).
        let start = segment.size;
        let len = segment.file.metadata().map_err(io_err(&path))?.len();
        let mut bytes = vec![0u8; len.saturating_sub(start) as usize];
        segment
            .file
            .read_exact_at(&mut bytes, start)
            .map_err(io_err(&path))?;
        let at = |position: usize| start + position as u64;
        let mut position = 0usize;
        while position < bytes.len() {
            match decode_record(&bytes[position..]) {
                Some((record, len)) if record.offset >= segment.end => {
                    segment.note(record.offset, at(position), record.time, len as u64);
                    position += len;
                }
                _ => match resync(&bytes, position, segment.end) {
                    Some(next) => {
                        tracing::error!(
                            path = %path.display(),
                            from = at(position),
                            to = at(next),
                            after_offset = segment.end,
                            "skipping a damaged record; the records after it are kept"
                        );
                        segment.holes().insert(at(position), at(next));
                        position = next;
                    }
                    None if last => {
                        tracing::warn!(
                            path = %path.display(),
                            kept = at(position),
                            dropped = bytes.len() - position,
                            "truncating a torn tail left by a crash"
                        );
                        segment.file.set_len(at(position)).map_err(io_err(&path))?;
                        segment.file.sync_all().map_err(io_err(&path))?;
                        break;
                    }
                    None => {
                        tracing::error!(
                            path = %path.display(),
                            from = at(position),
                            lost = bytes.len() - position,
                            "the end of a sealed segment is damaged; its records are lost"
                        );
                        break;
                    }
                },
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
        if let Some(reason) = &self.stopped {
            return Err(LogError::Stopped {
                path: self.dir.clone(),
                reason: reason.clone(),
            });
        }
        if let Some((_, payload)) = batch.iter().find(|(_, p)| p.len() > MAX_PAYLOAD) {
            return Err(LogError::TooLarge { len: payload.len() });
        }
        let (fail_write, fail_cut_back) = self.injected_faults();
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
        let written = write_durably(&mut self.active, &buf, fail_write);
        if let Err(source) = written {
            // Cut back whatever part of the batch reached the file. If even that
            // fails, the file ends in garbage that later appends would follow: stop
            // instead (recovery on the next start cuts the garbage as a torn tail).
            if let Err(cut_err) = cut_back(&self.active, start, fail_cut_back) {
                tracing::error!(
                    path = %active.path.display(),
                    error = %cut_err,
                    "cannot cut back a failed write; the partition stops accepting telemetry"
                );
                self.stopped = Some(cut_err.to_string());
            }
            return Err(LogError::Io {
                path: active.path.clone(),
                source,
            });
        }
        for (i, (position, time, len)) in placed.into_iter().enumerate() {
            active.note(first + i as u64, position, time, len);
        }
        // A checkpoint of the active segment's index every quarter segment: after a
        // crash only what follows it is walked. Written after the batch is durable,
        // so it never covers a record that is not.
        if active.size >= self.indexed_at + (self.segment_bytes / 4).max(1) {
            active.store_index(&self.dir);
            self.indexed_at = active.size;
        }
        if active.size >= self.segment_bytes
            && let Err(err) = self.roll()
        {
            // The batch is durable and must be acknowledged; the full segment just
            // grows until a later append manages to roll over.
            tracing::warn!(error = %err, "cannot start a new segment; will retry");
        }
        Ok(first)
    }

    /// (write, cut-back) faults to inject: none outside tests.
    fn injected_faults(&self) -> (bool, bool) {
        #[cfg(test)]
        return (self.faults.write, self.faults.cut_back);
        #[cfg(not(test))]
        (false, false)
    }

    /// Whether a failed cut-back stopped this partition.
    pub fn is_stopped(&self) -> bool {
        self.stopped.is_some()
    }

    /// Starts a new segment at the current end.
    fn roll(&mut self) -> Result<(), LogError> {
        let base = self.end_offset();
        let path = segment_path(&self.dir, base);
        #[cfg(test)]
        if self.faults.roll {
            return Err(LogError::Io {
                path,
                source: io::Error::other("injected roll fault"),
            });
        }
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
        self.indexed_at = 0;
        // The sealed segment never changes again: its index lets the next start
        // skip reading it.
        if let Some(sealed) = self.segments.values().next_back() {
            sealed.store_index(&self.dir);
        }
        self.segments
            .insert(base, Segment::empty(base, path, reader));
        Ok(())
    }

    /// Persists the active segment's index after the last append (a clean
    /// shutdown), so the next start reads no segment at all (the next open walks
    /// only what the file holds beyond the length the index records).
    pub fn close(&mut self) {
        if self.stopped.is_some() {
            // The file may end in garbage: the next start must walk it.
            return;
        }
        if let Some(segment) = self.segments.values().next_back() {
            segment.store_index(&self.dir);
        }
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
            let (mut expected, mut position) = segment.entry_for(next);
            let mut chunk = Vec::new();
            while position < segment.size && out.len() < max && bytes < max_bytes {
                // Holes hold no records: jump over them, and never read a chunk
                // across the start of one.
                let (inside, limit) = {
                    let holes = segment.holes();
                    let inside = holes
                        .range(..=position)
                        .next_back()
                        .map(|(_, &end)| end)
                        .filter(|&end| end > position);
                    let limit = holes
                        .range(position..)
                        .next()
                        .map_or(segment.size, |(&start, _)| start.min(segment.size));
                    (inside, limit)
                };
                if let Some(end) = inside {
                    position = end;
                    continue;
                }
                let want = (limit - position).min(256 * 1024) as usize;
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
                    expected = record.offset + 1;
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
                if at > 0 {
                    position += at as u64;
                    continue;
                }
                // Not even one record in the chunk: one larger than the chunk, or
                // damage that no walk has seen (it appeared after the segment's index
                // was written), skipped as the walk would have.
                match segment.whole_record_at(position, limit)? {
                    Some((record, len)) => {
                        position += len as u64;
                        expected = record.offset + 1;
                        if record.offset >= next {
                            bytes += record.payload.len();
                            next = record.offset + 1;
                            out.push(record);
                        }
                    }
                    None => position = segment.skip_damage(position, limit, expected)?,
                }
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
            // The index first: an index left without its segment is removed at the
            // next open, a segment left without its index is only walked.
            segment_index::remove(&self.dir, base).map_err(io_err(&self.dir))?;
            fs::remove_file(&path).map_err(io_err(&path))?;
            removed += 1;
        }
        Ok(removed)
    }
}

/// Writes `buf` and syncs it (`fail` injects an error in tests).
fn write_durably(file: &mut File, buf: &[u8], fail: bool) -> io::Result<()> {
    if fail {
        // Part of the batch reaches the file before the failure, as in real life.
        file.write_all(&buf[..buf.len() / 2])?;
        return Err(io::Error::other("injected write fault"));
    }
    file.write_all(buf).and_then(|()| file.sync_data())
}

/// Truncates the active file back to `len` (`fail` injects an error in tests).
fn cut_back(file: &File, len: u64, fail: bool) -> io::Result<()> {
    if fail {
        return Err(io::Error::other("injected cut-back fault"));
    }
    file.set_len(len)
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

    /// Byte position of the record with `offset` in segment 0 (records of `size`).
    fn position(offset: u64, size: usize) -> usize {
        offset as usize * (HEADER_LEN + size)
    }

    #[test]
    fn a_damaged_record_mid_segment_is_skipped_and_the_later_ones_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = SegmentLog::open(dir.path(), 1 << 20).unwrap();
            log.append(&batch(10, 50, 1)).unwrap();
        }
        let path = segment_path(dir.path(), 0);
        let mut bytes = fs::read(&path).unwrap();
        // A flipped bit in the payload of offset 3, and a wrecked header of offset 6.
        bytes[position(3, 50) + HEADER_LEN + 7] ^= 0x10;
        bytes[position(6, 50)..position(6, 50) + 8].fill(0xff);
        let len = bytes.len() as u64;
        fs::write(&path, bytes).unwrap();

        let mut log = SegmentLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), len, "nothing truncated");
        assert_eq!(
            log.end_offset(),
            10,
            "acknowledged records after the damage kept"
        );
        let offsets: Vec<u64> = log
            .read(0, 100, usize::MAX)
            .unwrap()
            .iter()
            .map(|r| r.offset)
            .collect();
        assert_eq!(offsets, [0, 1, 2, 4, 5, 7, 8, 9]);
        // Reading from a lost offset, or from inside the damage, resumes after it.
        assert_eq!(log.read(3, 1, usize::MAX).unwrap()[0].offset, 4);
        assert_eq!(log.read(6, 2, usize::MAX).unwrap()[1].offset, 8);
        // The log continues after the last record.
        assert_eq!(log.append(&batch(1, 50, 1)).unwrap(), 10);
        assert_eq!(log.read(9, 10, usize::MAX).unwrap().len(), 2);
    }

    #[test]
    fn a_torn_tail_after_a_hole_is_still_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = SegmentLog::open(dir.path(), 1 << 20).unwrap();
            log.append(&batch(5, 50, 1)).unwrap();
        }
        let path = segment_path(dir.path(), 0);
        let mut bytes = fs::read(&path).unwrap();
        bytes[position(1, 50) + HEADER_LEN] ^= 0x01;
        let mut torn = Vec::new();
        encode_record(&mut torn, 5, 1, &[7u8; 50]);
        bytes.extend_from_slice(&torn[..40]);
        fs::write(&path, &bytes).unwrap();

        let log = SegmentLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(log.end_offset(), 5);
        assert_eq!(
            fs::metadata(&path).unwrap().len() as usize,
            position(5, 50),
            "the torn record is cut, the hole is not"
        );
        assert_eq!(log.read(0, 10, usize::MAX).unwrap().len(), 4);
    }

    #[test]
    fn a_damaged_sealed_segment_keeps_its_readable_records_and_the_log_opens() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = SegmentLog::open(dir.path(), 300).unwrap();
            log.append(&batch(5, 50, 1)).unwrap();
            log.append(&batch(2, 50, 1)).unwrap();
        }
        let sealed = segment_path(dir.path(), 0);
        let mut bytes = fs::read(&sealed).unwrap();
        bytes[position(2, 50) + HEADER_LEN] ^= 0x01;
        fs::write(&sealed, &bytes).unwrap();
        let log = SegmentLog::open(dir.path(), 300).unwrap();
        let offsets: Vec<u64> = log
            .read(0, 100, usize::MAX)
            .unwrap()
            .iter()
            .map(|r| r.offset)
            .collect();
        assert_eq!(offsets, [0, 1, 3, 4, 5, 6]);
    }

    fn offsets(log: &SegmentLog, from: u64) -> Vec<u64> {
        log.read(from, 1000, usize::MAX)
            .unwrap()
            .iter()
            .map(|r| r.offset)
            .collect()
    }

    /// A log of 4 sealed segments of 4 records (50-byte payloads, 74-byte records)
    /// and an active one holding offsets 16 and 17.
    fn sealed_log(dir: &Path) -> SegmentLog {
        let mut log = SegmentLog::open(dir, 4 * 74).unwrap();
        for _ in 0..4 {
            log.append(&batch(4, 50, 1)).unwrap();
        }
        log.append(&batch(2, 50, 1)).unwrap();
        assert_eq!(log.segments.len(), 5);
        log
    }

    #[test]
    fn sealed_segments_reopen_from_their_indexes_without_reading_records() {
        let dir = tempfile::tempdir().unwrap();
        let log = sealed_log(dir.path());
        let before: Vec<SegmentIndex> = log.segments.values().map(|s| s.to_index(0)).collect();
        drop(log);
        for base in [0, 4, 8, 12] {
            assert!(
                segment_index::index_path(dir.path(), base).exists(),
                "{base}"
            );
        }
        // Damage a sealed record the index already describes: an open that used the
        // index did not read it, so it finds no hole.
        let sealed = segment_path(dir.path(), 4);
        let mut bytes = fs::read(&sealed).unwrap();
        bytes[HEADER_LEN + 3] ^= 0x01;
        fs::write(&sealed, &bytes).unwrap();

        let log = SegmentLog::open(dir.path(), 4 * 74).unwrap();
        let after: Vec<SegmentIndex> = log.segments.values().map(|s| s.to_index(0)).collect();
        assert_eq!(after, before);
        assert!(
            log.segments[&4].holes().is_empty(),
            "segment 4 was not walked"
        );
        // The read that meets the damage skips it, as a walk would have.
        let mut expected: Vec<u64> = (0..18).collect();
        expected.retain(|&o| o != 4);
        assert_eq!(offsets(&log, 0), expected);
        assert_eq!(
            log.segments[&4].holes().len(),
            1,
            "remembered for later reads"
        );
        assert_eq!(offsets(&log, 4)[0], 5);
        assert_eq!(offsets(&log, 0), expected);
    }

    #[test]
    fn a_damaged_or_torn_index_is_detected_and_its_segment_walked_again() {
        let dir = tempfile::tempdir().unwrap();
        drop(sealed_log(dir.path()));
        // Segment 0: a flipped bit in its index, and a damaged record (the walk that
        // replaces the index must find it). Segment 4: a torn index. Segment 8: an
        // index of another length (the segment grew garbage). Segment 12: no index.
        let index0 = segment_index::index_path(dir.path(), 0);
        let mut bytes = fs::read(&index0).unwrap();
        bytes[20] ^= 0x40;
        fs::write(&index0, &bytes).unwrap();
        let segment0 = segment_path(dir.path(), 0);
        let mut bytes = fs::read(&segment0).unwrap();
        bytes[position(1, 50) + HEADER_LEN + 9] ^= 0x02;
        fs::write(&segment0, &bytes).unwrap();
        let index4 = segment_index::index_path(dir.path(), 4);
        let bytes = fs::read(&index4).unwrap();
        fs::write(&index4, &bytes[..bytes.len() - 3]).unwrap();
        let segment8 = segment_path(dir.path(), 8);
        OpenOptions::new()
            .append(true)
            .open(&segment8)
            .unwrap()
            .write_all(&[0xee; 30])
            .unwrap();
        fs::remove_file(segment_index::index_path(dir.path(), 12)).unwrap();

        let log = SegmentLog::open(dir.path(), 4 * 74).unwrap();
        assert_eq!(
            log.segments[&0].holes().len(),
            1,
            "the walk found the damaged record"
        );
        let mut expected: Vec<u64> = (0..18).collect();
        expected.retain(|&o| o != 1);
        assert_eq!(offsets(&log, 0), expected);
        assert_eq!(log.end_offset(), 18);
        // Every sealed segment has a usable index again, describing what the walk
        // found (the hole in segment 0, the garbage after segment 8's records).
        for base in [0, 4, 8, 12] {
            let len = fs::metadata(segment_path(dir.path(), base)).unwrap().len();
            let stored = SegmentIndex::load(dir.path(), base, len, false).unwrap();
            assert_eq!(stored.end, base + 4, "{base}");
            assert_eq!(stored.holes.len(), usize::from(base == 0), "{base}");
            assert_eq!(stored.size, 4 * 74, "{base}");
        }
        drop(log);
        let log = SegmentLog::open(dir.path(), 4 * 74).unwrap();
        assert_eq!(
            offsets(&log, 0),
            expected,
            "the rebuilt indexes read the same"
        );
    }

    #[test]
    fn a_clean_close_spares_the_next_open_a_walk_and_a_crash_after_it_cuts_the_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = sealed_log(dir.path());
        log.close();
        drop(log);
        let active = segment_index::index_path(dir.path(), 16);
        assert!(active.exists(), "written by the clean close");
        let mut log = SegmentLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(log.end_offset(), 18);
        log.append(&batch(1, 50, 1)).unwrap();
        drop(log);
        // A crash mid-write: the next open walks the active segment and cuts the
        // torn tail.
        let path = segment_path(dir.path(), 16);
        let good_len = fs::metadata(&path).unwrap().len();
        let mut torn = Vec::new();
        encode_record(&mut torn, 19, 1, &[9u8; 50]);
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&torn[..40])
            .unwrap();
        let log = SegmentLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(log.end_offset(), 19);
        assert_eq!(fs::metadata(&path).unwrap().len(), good_len);
        assert_eq!(offsets(&log, 0), (0..19).collect::<Vec<_>>());
    }

    #[test]
    fn a_crash_walks_the_active_segment_only_past_its_last_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment_path(dir.path(), 0);
        {
            // A checkpoint every 256 KiB of a 1 MiB segment; 8 batches of ~52 KB.
            let mut log = SegmentLog::open(dir.path(), 1 << 20).unwrap();
            for _ in 0..8 {
                log.append(&batch(100, 500, 1)).unwrap();
            }
        }
        let len = fs::metadata(&path).unwrap().len();
        let checkpoint = SegmentIndex::load(dir.path(), 0, len, true).unwrap();
        assert!(
            checkpoint.size >= 256 * 1024 && checkpoint.size < len,
            "{} of {len}",
            checkpoint.size
        );
        // Damage inside the checkpointed prefix (not walked again: found by the
        // read that meets it) and a torn write after it (walked: cut off).
        let mut bytes = fs::read(&path).unwrap();
        bytes[position(1, 500) + HEADER_LEN + 5] ^= 0x04;
        let mut torn = Vec::new();
        encode_record(&mut torn, 800, 1, &[9u8; 500]);
        bytes.extend_from_slice(&torn[..100]);
        fs::write(&path, &bytes).unwrap();

        let mut log = SegmentLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(log.end_offset(), 800);
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            len,
            "the torn write is cut"
        );
        assert!(
            log.segments[&0].holes().is_empty(),
            "the prefix was not walked"
        );
        let mut expected: Vec<u64> = (0..800).collect();
        expected.retain(|&o| o != 1);
        assert_eq!(offsets(&log, 0), expected);
        assert_eq!(log.append(&batch(1, 500, 1)).unwrap(), 800);
        // A checkpoint longer than the file (the file was cut below it) is not used.
        drop(log);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(checkpoint.size - 10).unwrap();
        drop(file);
        let log = SegmentLog::open(dir.path(), 1 << 20).unwrap();
        assert!(log.end_offset() < 800);
        assert_eq!(log.segments[&0].holes().len(), 1, "walked from the start");
    }

    #[test]
    fn retention_removes_indexes_with_their_segments_and_open_removes_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = sealed_log(dir.path());
        log.apply_retention(i64::MAX, 0).unwrap();
        assert_eq!(log.first_offset(), 16);
        for base in [0, 4, 8, 12] {
            assert!(!segment_index::index_path(dir.path(), base).exists());
        }
        drop(log);
        let orphan = segment_index::index_path(dir.path(), 2);
        fs::write(&orphan, b"left behind").unwrap();
        let log = SegmentLog::open(dir.path(), 4 * 74).unwrap();
        assert!(!orphan.exists());
        assert_eq!(offsets(&log, 16), [16, 17]);
    }

    #[test]
    fn a_rollover_that_cannot_create_a_file_does_not_fail_the_durable_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(dir.path(), 200).unwrap();
        log.faults.roll = true;
        assert_eq!(log.append(&batch(3, 50, 1)).unwrap(), 0, "acknowledged");
        assert_eq!(log.append(&batch(1, 50, 1)).unwrap(), 3, "still appending");
        assert_eq!(log.segments.len(), 1, "no new segment yet");
        log.faults.roll = false;
        assert_eq!(log.append(&batch(1, 50, 1)).unwrap(), 4);
        assert_eq!(log.segments.len(), 2, "rolled over once it could");
        assert_eq!(log.read(0, 10, usize::MAX).unwrap().len(), 5);
        drop(log);
        let log = SegmentLog::open(dir.path(), 200).unwrap();
        assert_eq!(log.end_offset(), 5);
    }

    #[test]
    fn a_failed_write_is_cut_back_and_the_log_continues() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(dir.path(), 1 << 20).unwrap();
        log.append(&batch(2, 50, 1)).unwrap();
        log.faults.write = true;
        assert!(log.append(&batch(2, 50, 1)).is_err());
        log.faults.write = false;
        assert!(!log.is_stopped());
        assert_eq!(log.append(&batch(1, 50, 1)).unwrap(), 2);
        assert_eq!(log.read(0, 10, usize::MAX).unwrap().len(), 3);
    }

    #[test]
    fn a_failed_cut_back_stops_the_partition_instead_of_appending_after_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(dir.path(), 1 << 20).unwrap();
        log.append(&batch(2, 50, 1)).unwrap();
        log.faults.write = true;
        log.faults.cut_back = true;
        // Half a record reaches the file.
        assert!(log.append(&batch(1, 50, 1)).is_err());
        log.faults = Faults::default();
        assert!(log.is_stopped());
        assert!(matches!(
            log.append(&batch(1, 50, 1)),
            Err(LogError::Stopped { .. })
        ));
        assert_eq!(log.read(0, 10, usize::MAX).unwrap().len(), 2);
        drop(log);
        // A restart cuts the half-written batch as a torn tail and goes on.
        let mut log = SegmentLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(log.end_offset(), 2);
        assert_eq!(log.append(&batch(1, 50, 1)).unwrap(), 2);
        assert_eq!(log.read(0, 10, usize::MAX).unwrap().len(), 3);
    }

    #[test]
    fn a_record_over_the_format_limit_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(dir.path(), 1 << 30).unwrap();
        let too_big = vec![(1, Bytes::from(vec![0u8; MAX_PAYLOAD + 1]))];
        assert!(matches!(
            log.append(&too_big),
            Err(LogError::TooLarge { .. })
        ));
        assert_eq!(log.total_bytes(), 0);
        assert_eq!(log.append(&batch(1, 10, 1)).unwrap(), 0);
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
