//! The daemon's durable store: enrollment tokens, devices, the reports of each round, round
//! summaries, the run state, small metadata, and model checkpoints.
//!
//! The daemon must never lose a report it has acknowledged, and must resume the current round
//! after a restart. So every write here is its own redb write transaction committed with redb's
//! default durability ([`redb::Durability::Immediate`]: the file is fsync'd before `commit`
//! returns), and every function returns only after that commit. A round is finished in one
//! transaction ([`Store::finish_round`]): its summary, the new run state and the deletion of old
//! reports become visible together or not at all.
//!
//! Why redb: it is pure Rust (no C toolchain in the build, unlike `SQLite`), ACID with fsync'd
//! commits and checksummed pages, keeps everything in one file, and is maintained; sled, the
//! other pure-Rust option, is unmaintained and still beta. Checkpoints are large and written
//! rarely, so they live beside the database as plain files (`checkpoints/round-NNNNNNNN.bin`),
//! each written atomically (temporary file, fsync, rename, fsync of the folder).
//!
//! Values are opaque bytes that the caller encodes; the store only decodes the few numbers it
//! keeps itself (token uses, the schema version), and a stored value that fails to decode is
//! reported as [`StoreError::Corrupt`], never a panic.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{Builder, Database, ReadableDatabase, ReadableTable, TableDefinition};
use tracing::{debug, warn};

/// A device id.
pub type DeviceKey = [u8; 16];

/// The name of the database file inside the store's folder.
const DB_FILE: &str = "store.redb";
/// The name of the checkpoint folder inside the store's folder.
const CHECKPOINT_DIR: &str = "checkpoints";
/// The layout of the tables below; bumped (with a migration) whenever it changes.
const SCHEMA_VERSION: u32 = 1;
/// The key of the schema version in [`INFO`].
const SCHEMA_KEY: &str = "schema_version";

/// The store's own bookkeeping (the schema version), apart from the caller's [`META`].
const INFO: TableDefinition<&str, &[u8]> = TableDefinition::new("store_info");
/// SHA-256 hash of an enrollment token → uses left (u32, little-endian).
const TOKENS: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("tokens");
/// Device id → the caller's device record.
const DEVICES: TableDefinition<DeviceKey, &[u8]> = TableDefinition::new("devices");
/// (round, device id) → the caller's report. Ordered by round, then device id.
const REPORTS: TableDefinition<(u64, DeviceKey), &[u8]> = TableDefinition::new("reports");
/// Round → the caller's summary of that finished round.
const SUMMARIES: TableDefinition<u64, &[u8]> = TableDefinition::new("round_summaries");
/// The single run state, under the unit key.
const STATE: TableDefinition<(), &[u8]> = TableDefinition::new("run_state");
/// The caller's small key/value metadata.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// The smallest and largest device ids, bounding one round's reports in [`REPORTS`].
const MIN_DEVICE: DeviceKey = [0; 16];
const MAX_DEVICE: DeviceKey = [0xff; 16];

/// Makes the names of temporary checkpoint files unique within this process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// An error of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database failed to open, begin a transaction, open a table, read, write or commit.
    #[error("store database: {0}")]
    Db(#[from] redb::Error),
    /// A file or folder of the store could not be created, written, synced, renamed, listed or
    /// removed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Data read from disk is not what the store wrote.
    #[error("store data is corrupt: {what}")]
    Corrupt {
        /// What is corrupt.
        what: String,
    },
    /// The store was written by a newer fedtune with a table layout this build does not know.
    #[error("store schema version {found} is newer than the supported version {supported}")]
    Version {
        /// The version recorded in the store.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },
}

impl StoreError {
    /// A [`StoreError::Io`] for `path`.
    fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A [`StoreError::Corrupt`] saying `what`.
    fn corrupt(what: impl Into<String>) -> Self {
        Self::Corrupt { what: what.into() }
    }

    /// Wraps any redb error. redb's corruption reports, and its "not a redb database" (an I/O
    /// error of kind `InvalidData`), become [`StoreError::Corrupt`].
    fn redb(error: impl Into<redb::Error>) -> Self {
        match error.into() {
            redb::Error::Corrupted(what) => Self::Corrupt { what },
            redb::Error::Io(error) if error.kind() == io::ErrorKind::InvalidData => Self::Corrupt {
                what: error.to_string(),
            },
            other => Self::Db(other),
        }
    }
}

/// Converts each of redb's error types into a [`StoreError`] (for `?`).
macro_rules! from_redb {
    ($($t:ty),+) => {$(
        impl From<$t> for StoreError {
            fn from(error: $t) -> Self {
                Self::redb(error)
            }
        }
    )+};
}

from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Whether [`Store::put_report`] stored the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The report was stored, durably.
    Inserted,
    /// A report of this device for this round was already stored; nothing changed.
    Duplicate,
}

/// The daemon's durable store: one redb database (`store.redb`) and a `checkpoints/` folder,
/// both inside one folder.
///
/// Every method that writes commits durably before it returns. Methods take `&self`; redb
/// serialises write transactions, so a `Store` can be shared between threads (for example in an
/// `Arc`). Only one process can open a store at a time (redb locks the file).
pub struct Store {
    /// The database.
    db: Database,
    /// The store's folder.
    dir: PathBuf,
    /// `dir/checkpoints`.
    checkpoints: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) `dir/store.redb` and `dir/checkpoints/`; creates `dir`.
    ///
    /// The whole database file is checked on open (page checksums), so a damaged file is an
    /// error ([`StoreError::Corrupt`] or [`StoreError::Db`]) rather than a panic later. Temporary
    /// files left in `checkpoints/` by a checkpoint write that crashed are removed.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
        let checkpoints = dir.join(CHECKPOINT_DIR);
        fs::create_dir_all(&checkpoints).map_err(|e| StoreError::io(&checkpoints, e))?;
        let path = dir.join(DB_FILE);
        let db = Builder::new()
            .set_check_integrity_on_open(true)
            .create(&path)?;
        // Makes the new file's and folder's directory entries durable too.
        sync_dir(dir)?;

        let txn = db.begin_write()?;
        {
            // Creates every table, so that readers always find them.
            txn.open_table(TOKENS)?;
            txn.open_table(DEVICES)?;
            txn.open_table(REPORTS)?;
            txn.open_table(SUMMARIES)?;
            txn.open_table(STATE)?;
            txn.open_table(META)?;
            let mut info = txn.open_table(INFO)?;
            let found = match info.get(SCHEMA_KEY)? {
                Some(bytes) => Some(decode_u32(bytes.value(), "schema version")?),
                None => None,
            };
            match found {
                None => {
                    info.insert(SCHEMA_KEY, SCHEMA_VERSION.to_le_bytes().as_slice())?;
                }
                Some(found) if found > SCHEMA_VERSION => {
                    return Err(StoreError::Version {
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
                Some(_) => {}
            }
        }
        txn.commit()?;

        let store = Self {
            db,
            dir: dir.to_path_buf(),
            checkpoints,
        };
        store.remove_stale_temps()?;
        debug!(path = %path.display(), "store opened");
        Ok(store)
    }

    /// The store's folder.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stores an enrollment token (its SHA-256 hash; the caller hashes) with `uses` uses left,
    /// replacing the uses of the same token if it is already stored. With `uses == 0` the token
    /// is removed instead.
    pub fn add_token(&self, token_hash: [u8; 32], uses: u32) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut tokens = txn.open_table(TOKENS)?;
            if uses == 0 {
                tokens.remove(token_hash)?;
            } else {
                tokens.insert(token_hash, uses.to_le_bytes().as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Atomically decrements the uses of a token; Ok(false) if unknown or exhausted (exhausted
    /// tokens are removed).
    ///
    /// Returns Ok(true) when a use was taken; the token is removed with its last use.
    pub fn consume_token(&self, token_hash: [u8; 32]) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        match take_token_use(&txn, token_hash)? {
            None => {
                txn.abort()?;
                Ok(false)
            }
            Some(taken) => {
                txn.commit()?;
                Ok(taken)
            }
        }
    }

    /// Stores (or replaces) the record of device `id`.
    pub fn put_device(&self, id: DeviceKey, record: &[u8]) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(DEVICES)?.insert(id, record)?;
        txn.commit()?;
        Ok(())
    }

    /// The record of device `id`, if stored.
    pub fn device(&self, id: DeviceKey) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let devices = txn.open_table(DEVICES)?;
        Ok(devices.get(id)?.map(|v| v.value().to_vec()))
    }

    /// Every device with its record, sorted by id.
    pub fn devices(&self) -> Result<Vec<(DeviceKey, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read()?;
        let devices = txn.open_table(DEVICES)?;
        devices
            .iter()?
            .map(|entry| {
                let (k, v) = entry?;
                Ok((k.value(), v.value().to_vec()))
            })
            .collect()
    }

    /// Inserts unless a report for (round, device) exists, in which case nothing changes and
    /// Duplicate is returned.
    ///
    /// [`PutOutcome::Inserted`] is returned only once the report is durable (committed and
    /// fsync'd), so the caller may acknowledge it.
    pub fn put_report(
        &self,
        round: u64,
        device: DeviceKey,
        report: &[u8],
    ) -> Result<PutOutcome, StoreError> {
        self.put_report_and_device(round, device, report, None)
    }

    /// [`Self::put_report`] and, in the same transaction, the device's updated record (when
    /// given): one durable commit per report instead of two.
    pub fn put_report_and_device(
        &self,
        round: u64,
        device: DeviceKey,
        report: &[u8],
        record: Option<&[u8]>,
    ) -> Result<PutOutcome, StoreError> {
        let txn = self.db.begin_write()?;
        let inserted = {
            let mut reports = txn.open_table(REPORTS)?;
            if reports.get((round, device))?.is_some() {
                false
            } else {
                reports.insert((round, device), report)?;
                if let Some(record) = record {
                    txn.open_table(DEVICES)?.insert(device, record)?;
                }
                true
            }
        };
        if inserted {
            txn.commit()?;
            Ok(PutOutcome::Inserted)
        } else {
            txn.abort()?;
            Ok(PutOutcome::Duplicate)
        }
    }

    /// Whether a report of `device` for `round` is stored (without reading the round's others).
    pub fn has_report(&self, round: u64, device: DeviceKey) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        let reports = txn.open_table(REPORTS)?;
        Ok(reports.get((round, device))?.is_some())
    }

    /// Enrolls a device in one transaction: takes one use of the token and stores the device's
    /// record. Ok(false), with nothing changed, when the token is unknown or used up.
    pub fn enroll(
        &self,
        token_hash: [u8; 32],
        id: DeviceKey,
        record: &[u8],
    ) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        match take_token_use(&txn, token_hash)? {
            None => {
                txn.abort()?;
                Ok(false)
            }
            Some(false) => {
                // The exhausted token was removed; keep that.
                txn.commit()?;
                Ok(false)
            }
            Some(true) => {
                txn.open_table(DEVICES)?.insert(id, record)?;
                txn.commit()?;
                Ok(true)
            }
        }
    }

    /// The reports of `round` with their devices, sorted by device id.
    pub fn reports(&self, round: u64) -> Result<Vec<(DeviceKey, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read()?;
        let reports = txn.open_table(REPORTS)?;
        reports
            .range((round, MIN_DEVICE)..=(round, MAX_DEVICE))?
            .map(|entry| {
                let (k, v) = entry?;
                Ok((k.value().1, v.value().to_vec()))
            })
            .collect()
    }

    /// How many reports `round` has.
    pub fn report_count(&self, round: u64) -> Result<usize, StoreError> {
        let txn = self.db.begin_read()?;
        let reports = txn.open_table(REPORTS)?;
        let mut count = 0;
        for entry in reports.range((round, MIN_DEVICE)..=(round, MAX_DEVICE))? {
            entry?;
            count += 1;
        }
        Ok(count)
    }

    /// Atomically (one write transaction): records `summary` as round `round`'s summary
    /// (replacing an earlier one of the same round), replaces the run state with `state`, and
    /// deletes the reports of every round `r` with `r + keep_report_rounds <= round`.
    ///
    /// So `keep_report_rounds == 0` deletes the finished round's reports too, `1` keeps the
    /// finished round's and deletes older ones, `2` also keeps the round before it, and so on.
    pub fn finish_round(
        &self,
        round: u64,
        summary: &[u8],
        state: &[u8],
        keep_report_rounds: u64,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        let mut deleted = 0usize;
        {
            txn.open_table(SUMMARIES)?.insert(round, summary)?;
            txn.open_table(STATE)?.insert((), state)?;
            // r + keep <= round  <=>  r <= round - keep (nothing when keep > round).
            if let Some(last) = round.checked_sub(keep_report_rounds) {
                let mut reports = txn.open_table(REPORTS)?;
                for entry in reports.extract_from_if(..=(last, MAX_DEVICE), |_, _| true)? {
                    entry?;
                    deleted += 1;
                }
            }
        }
        txn.commit()?;
        debug!(round, deleted_reports = deleted, "round finished");
        Ok(())
    }

    /// The run state last written by `finish_round` or `put_state` (None before the first).
    pub fn state(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let state = txn.open_table(STATE)?;
        Ok(state.get(())?.map(|v| v.value().to_vec()))
    }

    /// Writes the run state alone (used when a run starts).
    pub fn put_state(&self, state: &[u8]) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(STATE)?.insert((), state)?;
        txn.commit()?;
        Ok(())
    }

    /// The summaries of the finished rounds, ascending by round.
    pub fn round_summaries(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read()?;
        let summaries = txn.open_table(SUMMARIES)?;
        summaries
            .iter()?
            .map(|entry| {
                let (k, v) = entry?;
                Ok((k.value(), v.value().to_vec()))
            })
            .collect()
    }

    /// Writes `bytes` as the checkpoint of `round` (`checkpoints/round-{round:08}.bin`,
    /// replacing an existing one) and returns its path.
    ///
    /// The write is atomic: a temporary file in the same folder is written and fsync'd, then
    /// renamed over the final name, then the folder is fsync'd; a crash leaves either the old
    /// file or the new one, never a partial one. Afterwards only the newest `keep` checkpoints
    /// (by round) are kept and older files are deleted; the file just written is never deleted,
    /// so `keep == 0` acts as 1. A failure to delete an old checkpoint is logged, not returned,
    /// since the new checkpoint is already durable.
    pub fn write_checkpoint(
        &self,
        round: u64,
        bytes: &[u8],
        keep: usize,
    ) -> Result<PathBuf, StoreError> {
        let name = checkpoint_name(round);
        let path = self.checkpoints.join(&name);
        let temp = self.checkpoints.join(format!(
            ".{name}.{}.{}.tmp",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let written = write_synced(&temp, bytes)
            .map_err(|e| StoreError::io(&temp, e))
            .and_then(|()| fs::rename(&temp, &path).map_err(|e| StoreError::io(&path, e)));
        if let Err(error) = written {
            // Best effort: the temporary file is useless now (and removed on the next open).
            let _ = fs::remove_file(&temp);
            return Err(error);
        }
        sync_dir(&self.checkpoints)?;
        debug!(round, path = %path.display(), "checkpoint written");

        match self.checkpoint_files() {
            Ok(mut files) => {
                files.sort_unstable_by_key(|(round, _)| std::cmp::Reverse(*round));
                for (old, old_path) in files.into_iter().skip(keep.max(1)) {
                    if old == round {
                        continue;
                    }
                    match fs::remove_file(&old_path) {
                        Ok(()) => debug!(round = old, "old checkpoint deleted"),
                        Err(error) => warn!(
                            path = %old_path.display(), %error, "could not delete old checkpoint"
                        ),
                    }
                }
            }
            Err(error) => warn!(%error, "could not list checkpoints to delete old ones"),
        }
        Ok(path)
    }

    /// The newest checkpoint (highest round) and its path, if any.
    pub fn latest_checkpoint(&self) -> Result<Option<(u64, PathBuf)>, StoreError> {
        Ok(self
            .checkpoint_files()?
            .into_iter()
            .max_by_key(|(round, _)| *round))
    }

    /// Stores (or replaces) the metadata value of `key`.
    pub fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(META)?.insert(key, value)?;
        txn.commit()?;
        Ok(())
    }

    /// The metadata value of `key`, if stored.
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Every checkpoint file (`round-N.bin`) in `checkpoints/` with its round, unordered.
    fn checkpoint_files(&self) -> Result<Vec<(u64, PathBuf)>, StoreError> {
        let dir = &self.checkpoints;
        let mut files = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))? {
            let entry = entry.map_err(|e| StoreError::io(dir, e))?;
            let path = entry.path();
            let is_file = entry
                .file_type()
                .map_err(|e| StoreError::io(&path, e))?
                .is_file();
            let round = entry.file_name().to_str().and_then(parse_checkpoint_name);
            if let (true, Some(round)) = (is_file, round) {
                files.push((round, path));
            }
        }
        Ok(files)
    }

    /// Removes the temporary files of checkpoint writes that did not finish.
    fn remove_stale_temps(&self) -> Result<(), StoreError> {
        let dir = &self.checkpoints;
        for entry in fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))? {
            let entry = entry.map_err(|e| StoreError::io(dir, e))?;
            let name = entry.file_name();
            let stale = name
                .to_str()
                .is_some_and(|n| n.starts_with(".round-") && n.rsplit('.').next() == Some("tmp"));
            if stale {
                let path = entry.path();
                warn!(path = %path.display(), "removing an unfinished checkpoint write");
                fs::remove_file(&path).map_err(|e| StoreError::io(&path, e))?;
            }
        }
        Ok(())
    }
}

/// The file name of the checkpoint of `round`.
fn checkpoint_name(round: u64) -> String {
    format!("round-{round:08}.bin")
}

/// The round of a checkpoint file name (`round-N.bin`, N decimal digits), or None.
fn parse_checkpoint_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("round-")?.strip_suffix(".bin")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Decodes a little-endian u32 the store wrote; anything else is [`StoreError::Corrupt`].
fn decode_u32(bytes: &[u8], what: &str) -> Result<u32, StoreError> {
    let array: [u8; 4] = bytes
        .try_into()
        .map_err(|_| StoreError::corrupt(format!("{what}: {} bytes, expected 4", bytes.len())))?;
    Ok(u32::from_le_bytes(array))
}

/// Creates `path` (which must not exist), writes `bytes` and fsyncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Fsyncs a folder, making the creation, renaming and removal of its entries durable.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))
}

/// Folders cannot be opened as files here; renames are durable once the file system says so.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<(), StoreError> {
    Ok(())
}

/// Takes one use of a token inside `txn`: `Some(true)` when a use was taken (the token goes with
/// its last use), `Some(false)` when it was exhausted (it is removed), `None` when it is unknown.
fn take_token_use(
    txn: &redb::WriteTransaction,
    token_hash: [u8; 32],
) -> Result<Option<bool>, StoreError> {
    let mut tokens = txn.open_table(TOKENS)?;
    let uses = match tokens.get(token_hash)? {
        Some(bytes) => decode_u32(bytes.value(), "token uses")?,
        None => return Ok(None),
    };
    match uses {
        0 => {
            tokens.remove(token_hash)?;
            Ok(Some(false))
        }
        1 => {
            tokens.remove(token_hash)?;
            Ok(Some(true))
        }
        n => {
            tokens.insert(token_hash, (n - 1).to_le_bytes().as_slice())?;
            Ok(Some(true))
        }
    }
}
