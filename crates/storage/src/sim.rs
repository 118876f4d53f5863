//! An in-memory file system for tests that knows what a crash and a power loss leave behind,
//! and fails, tears or cuts short any operation on demand ("The storage I/O seam" in
//! `docs/storage.md`).
//!
//! Each file holds two images: what reads see (the page cache) and what a completed
//! `fdatasync` put on the disk. Each directory holds its entries and the changes made since its
//! last `fsync`. [`SimFs::restart`] ends the "process": every handle of the old one fails from
//! then on, and the new one sees either everything (a process crash: the page cache survives) or
//! what a [`PowerLoss`] policy keeps.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::io::{DiskSpace, FileIo, Fs, Open};

/// The page size of the simulated page cache: the unit in which unsynced writes survive or not.
pub const PAGE: u64 = 4096;
/// The sector size: the unit of a torn page.
pub const SECTOR: usize = 512;

/// What happens to one page written since the last `fdatasync`, at a power loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageFate {
    /// The new bytes reached the disk.
    New,
    /// The disk still holds what it held at the last sync.
    Old,
    /// The first `n` sectors reached the disk, the rest did not.
    Torn(usize),
    /// The sectors whose bit is set reached the disk (a device may write a page's sectors in
    /// any order).
    Sectors(u8),
}

/// Chooses the fate of one unsynced page: (file path, page index).
pub type PageChooser = Box<dyn FnMut(&Path, u64) -> PageFate + Send>;

/// What a power loss keeps of what was not synced.
pub enum PowerLoss {
    /// Nothing: the disk holds exactly what was synced.
    KeepNothing,
    /// Everything reached the disk (as if the page cache had been written back just in time).
    KeepEverything,
    /// Pages, sizes and directory changes chosen from a seed: a size anywhere between the
    /// synced and the latest, any subset of a page's sectors, and stale bytes of other files
    /// in blocks the file had not synced.
    Random(u64),
    /// Each unsynced page as the function says (file path, page index); sizes as the pages
    /// imply, directory changes all kept.
    Pages(PageChooser),
}

/// How a simulated process ends.
pub enum Restart {
    /// `kill -9`: the page cache and directory entries survive, synced or not.
    ProcessCrash,
    /// The machine loses power.
    PowerLoss(PowerLoss),
}

/// The operation a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `read_at` (and uncached reads).
    Read,
    /// `write_at`.
    Write,
    /// `fdatasync` or `fsync` of a file.
    Sync,
    /// `set_len`.
    SetLen,
    /// `fsync` of a directory.
    SyncDir,
    /// Creating a file or directory, renaming, removing.
    Namespace,
}

/// What a fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The operation fails with this OS error number and has no effect. A failed `fdatasync`
    /// behaves as Linux's: the unsynced pages are marked clean without reaching the disk, so
    /// a later `fdatasync` succeeds and they are lost at the next power loss.
    Fail(i32),
    /// The process dies at this operation, before it has any effect: every handle fails from
    /// then on, until [`SimFs::restart`].
    Crash,
    /// A write stores only its first `n` bytes, then the process dies.
    TearAndCrash(usize),
    /// A write stores only its first `n` bytes, then fails with the OS error number.
    FailAfter(usize, i32),
    /// A read returns at most this many bytes (at least one).
    Short(usize),
    /// Just before the operation, another thread's `fsync` commits the file system's journal as
    /// ext4 (`data=ordered`) does: every file's dirty pages and size, and every directory's
    /// changes, reach the disk. Then the operation runs as usual.
    CommitJournalFirst,
}

/// A fault: `action` on the `skip + 1`th to `skip + times`th operation `op` on a path containing
/// `path` (any path when empty).
#[derive(Clone, Debug)]
pub struct Fault {
    pub op: Op,
    pub path: String,
    pub skip: u64,
    pub times: u64,
    pub action: Action,
}

impl Fault {
    /// `action` on every operation `op` on paths containing `path`, from the next one on.
    pub fn always(op: Op, path: &str, action: Action) -> Self {
        Self {
            op,
            path: path.to_owned(),
            skip: 0,
            times: u64::MAX,
            action,
        }
    }

    /// `action` once, on the `skip + 1`th operation `op` on paths containing `path`.
    pub fn once(op: Op, path: &str, skip: u64, action: Action) -> Self {
        Self {
            op,
            path: path.to_owned(),
            skip,
            times: 1,
            action,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    File(u64),
    Dir,
}

#[derive(Clone, Debug)]
enum DirChange {
    Set(String, Entry),
    Remove(String),
    Rename(String, String),
}

#[derive(Clone, Debug, Default)]
struct Dir {
    entries: BTreeMap<String, Entry>,
    durable: BTreeMap<String, Entry>,
    /// Changes since the last `fsync` of this directory, oldest first.
    pending: Vec<DirChange>,
}

impl Dir {
    fn apply(entries: &mut BTreeMap<String, Entry>, change: &DirChange) {
        match change {
            DirChange::Set(name, entry) => {
                entries.insert(name.clone(), entry.clone());
            }
            DirChange::Remove(name) => {
                entries.remove(name);
            }
            DirChange::Rename(from, to) => {
                if let Some(entry) = entries.remove(from) {
                    entries.insert(to.clone(), entry);
                }
            }
        }
    }

    fn change(&mut self, change: DirChange) {
        Self::apply(&mut self.entries, &change);
        self.pending.push(change);
    }
}

#[derive(Clone, Debug, Default)]
struct Inode {
    /// What reads see.
    data: Vec<u8>,
    /// What the disk holds.
    disk: Vec<u8>,
    /// Pages written (or zeroed by a length change) since they last reached the disk.
    dirty: BTreeSet<u64>,
    /// Pages with blocks on the disk: written at least once. A file extended by `set_len` has
    /// holes, which a full disk refuses to fill.
    allocated: BTreeSet<u64>,
}

impl Inode {
    fn mark(&mut self, from: u64, to: u64) {
        if to > from {
            self.dirty.extend(from / PAGE..to.div_ceil(PAGE));
        }
    }

    /// Replaces the bytes of `buf` (read from `data` at `offset`) that lie in clean pages with
    /// what the disk holds there (zeros past its end).
    fn overlay_disk(&self, buf: &mut [u8], offset: usize) {
        let end = offset + buf.len();
        let mut at = offset;
        while at < end {
            let page = at as u64 / PAGE;
            let page_end = (((page + 1) * PAGE) as usize).min(end);
            if !self.dirty.contains(&page) {
                for (i, b) in buf[at - offset..page_end - offset].iter_mut().enumerate() {
                    *b = self.disk.get(at + i).copied().unwrap_or(0);
                }
            }
            at = page_end;
        }
    }

    /// Writes the dirty pages (and the size) to the disk.
    fn write_back(&mut self) {
        let len = self.data.len();
        self.disk.resize(len, 0);
        for page in std::mem::take(&mut self.dirty) {
            let start = (page * PAGE) as usize;
            if start >= len {
                continue;
            }
            let end = (start + PAGE as usize).min(len);
            self.disk[start..end].copy_from_slice(&self.data[start..end]);
        }
    }
}

struct World {
    generation: u64,
    crashed: bool,
    dirs: BTreeMap<PathBuf, Dir>,
    inodes: HashMap<u64, Inode>,
    next_inode: u64,
    /// Bytes of allocated pages beyond which writes fail with `ENOSPC`.
    capacity: Option<u64>,
    faults: Vec<(Fault, u64)>,
    /// How many times a fault has fired.
    fired: u64,
    locks: BTreeSet<PathBuf>,
    syncs: u64,
}

/// The simulated file system. Clones share one world; [`SimFs::restart`] makes the next.
#[derive(Clone)]
pub struct SimFs {
    world: Arc<Mutex<World>>,
    generation: u64,
}

impl fmt::Debug for SimFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimFs")
            .field("generation", &self.generation)
            .finish()
    }
}

fn error(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

fn crashed() -> io::Error {
    io::Error::other("the simulated process has crashed")
}

/// `path` made absolute and free of `.` and `..`, relative paths taken from `/`.
fn normal(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

fn split(path: &Path) -> io::Result<(PathBuf, String)> {
    let path = normal(path);
    let name = path
        .file_name()
        .ok_or_else(|| error(libc::EINVAL))?
        .to_string_lossy()
        .into_owned();
    let parent = path
        .parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
    Ok((parent, name))
}

/// A small deterministic generator (splitmix64), so that a seed reproduces a power loss.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

impl Default for SimFs {
    fn default() -> Self {
        Self::new()
    }
}

impl SimFs {
    /// An empty file system holding only the root directory.
    pub fn new() -> Self {
        let mut dirs = BTreeMap::new();
        dirs.insert(PathBuf::from("/"), Dir::default());
        Self {
            world: Arc::new(Mutex::new(World {
                generation: 0,
                crashed: false,
                dirs,
                inodes: HashMap::new(),
                next_inode: 1,
                capacity: None,
                faults: Vec::new(),
                fired: 0,
                locks: BTreeSet::new(),
                syncs: 0,
            })),
            generation: 0,
        }
    }

    fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().expect("sim world lock poisoned")
    }

    /// The world, if this handle's process is still alive.
    fn live(&self) -> io::Result<MutexGuard<'_, World>> {
        let w = self.world();
        if w.generation != self.generation || w.crashed {
            return Err(crashed());
        }
        Ok(w)
    }

    /// Adds a fault.
    pub fn inject(&self, fault: Fault) {
        self.world().faults.push((fault, 0));
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        self.world().faults.clear();
    }

    /// Limits the bytes of pages all files may allocate together (`None`: no limit).
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.world().capacity = bytes;
    }

    /// The bytes of pages all files have allocated together.
    pub fn used(&self) -> u64 {
        self.world().used()
    }

    /// Whether the simulated process has died at an injected crash.
    pub fn has_crashed(&self) -> bool {
        let w = self.world();
        w.crashed || w.generation != self.generation
    }

    /// Ends the simulated process now, as an injected crash would.
    pub fn crash(&self) {
        let mut w = self.world();
        if w.generation == self.generation {
            w.crashed = true;
        }
    }

    /// How many times an injected fault fired so far.
    pub fn faults_fired(&self) -> u64 {
        self.world().fired
    }

    /// How many file `fdatasync`/`fsync` calls succeeded so far.
    pub fn syncs(&self) -> u64 {
        self.world().syncs
    }

    /// The bytes a read of `path` sees now (the page cache), if it exists.
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        let w = self.world();
        let ino = w.lookup_file(&normal(path))?;
        Some(w.inodes[&ino].data.clone())
    }

    /// Overwrites bytes of `path` as they are on the disk and in the cache (damage done while
    /// nothing runs, as a test edits a file by hand).
    pub fn damage(&self, path: &Path, offset: u64, bytes: &[u8]) {
        let mut w = self.world();
        let ino = w.lookup_file(&normal(path)).expect("damage: no such file");
        let inode = w.inodes.get_mut(&ino).expect("the inode of an entry");
        let end = offset as usize + bytes.len();
        for image in [&mut inode.data, &mut inode.disk] {
            if image.len() < end {
                image.resize(end, 0);
            }
            image[offset as usize..end].copy_from_slice(bytes);
        }
    }

    /// Ends this process and starts the next on what `how` leaves: every handle of this one
    /// (and of its files) fails from now on. Faults and locks do not survive.
    pub fn restart(&self, how: Restart) -> SimFs {
        let mut w = self.world();
        w.generation += 1;
        w.crashed = false;
        w.faults.clear();
        w.locks.clear();
        if let Restart::PowerLoss(policy) = how {
            w.power_loss(policy);
        }
        SimFs {
            world: Arc::clone(&self.world),
            generation: w.generation,
        }
    }

    /// Applies the first matching fault for `op` on `path`; `Ok(None)` when none fires.
    fn fault(w: &mut World, op: Op, path: &Path) -> Option<Action> {
        let path = path.to_string_lossy();
        for (fault, seen) in &mut w.faults {
            if fault.op != op || !path.contains(fault.path.as_str()) {
                continue;
            }
            *seen += 1;
            if *seen > fault.skip && *seen - fault.skip <= fault.times {
                w.fired += 1;
                return Some(fault.action);
            }
        }
        None
    }

    /// Fails, crashes or lets through an operation without data (`Short` and `TearAndCrash`
    /// apply to reads and writes only).
    fn gate(w: &mut World, op: Op, path: &Path) -> io::Result<()> {
        match Self::fault(w, op, path) {
            Some(Action::Fail(errno) | Action::FailAfter(_, errno)) => Err(error(errno)),
            Some(Action::Crash | Action::TearAndCrash(_)) => {
                w.crashed = true;
                Err(crashed())
            }
            Some(Action::CommitJournalFirst) => {
                w.commit_journal();
                Ok(())
            }
            Some(Action::Short(_)) | None => Ok(()),
        }
    }
}

impl World {
    /// Everything cached reaches the disk (see [`Action::CommitJournalFirst`]).
    fn commit_journal(&mut self) {
        for inode in self.inodes.values_mut() {
            inode.write_back();
        }
        for dir in self.dirs.values_mut() {
            dir.durable = dir.entries.clone();
            dir.pending.clear();
        }
    }

    fn used(&self) -> u64 {
        self.inodes
            .values()
            .map(|i| i.allocated.len() as u64 * PAGE)
            .sum()
    }

    fn lookup(&self, path: &Path) -> Option<Entry> {
        if path == Path::new("/") {
            return Some(Entry::Dir);
        }
        let (parent, name) = split(path).ok()?;
        self.dirs.get(&parent)?.entries.get(&name).cloned()
    }

    fn lookup_file(&self, path: &Path) -> Option<u64> {
        match self.lookup(path)? {
            Entry::File(ino) => Some(ino),
            Entry::Dir => None,
        }
    }

    fn dir_mut(&mut self, path: &Path) -> io::Result<&mut Dir> {
        self.dirs.get_mut(path).ok_or_else(|| error(libc::ENOENT))
    }

    fn power_loss(&mut self, policy: PowerLoss) {
        let mut chooser = match policy {
            PowerLoss::KeepNothing => Chooser::Nothing,
            PowerLoss::KeepEverything => Chooser::Everything,
            PowerLoss::Random(seed) => Chooser::Random(Rng(seed)),
            PowerLoss::Pages(f) => Chooser::Pages(f),
        };
        // Directories first: each keeps a prefix of its unsynced changes.
        let mut paths_of: HashMap<u64, PathBuf> = HashMap::new();
        for (path, dir) in &mut self.dirs {
            let keep = chooser.dir_prefix(dir.pending.len());
            let mut entries = std::mem::take(&mut dir.durable);
            for change in &dir.pending[..keep] {
                Dir::apply(&mut entries, change);
            }
            dir.entries = entries.clone();
            dir.durable = entries;
            dir.pending.clear();
            for (name, entry) in &dir.entries {
                if let Entry::File(ino) = entry {
                    paths_of.insert(*ino, path.join(name));
                }
            }
        }
        // Directories whose entry vanished vanish with everything in them.
        loop {
            let orphans: Vec<PathBuf> = self
                .dirs
                .keys()
                .filter(|p| p.as_path() != Path::new("/") && self.lookup(p) != Some(Entry::Dir))
                .cloned()
                .collect();
            if orphans.is_empty() {
                break;
            }
            for orphan in orphans {
                if let Some(dir) = self.dirs.remove(&orphan) {
                    for entry in dir.entries.values() {
                        if let Entry::File(ino) = entry {
                            paths_of.remove(ino);
                        }
                    }
                }
            }
        }
        self.inodes.retain(|ino, _| paths_of.contains_key(ino));
        // Then each file's size and unsynced pages.
        for (ino, inode) in &mut self.inodes {
            let path = &paths_of[ino];
            let mut disk = inode.disk.clone();
            let new_len = inode.data.len();
            let len = chooser.file_len(disk.len(), new_len);
            disk.resize(len, 0);
            let synced_len = inode.disk.len();
            for &page in &inode.dirty {
                let start = (page * PAGE) as usize;
                let end = (start + PAGE as usize).min(len).min(new_len);
                if start >= end {
                    continue;
                }
                match chooser.page(path, page) {
                    PageFate::New => disk[start..end].copy_from_slice(&inode.data[start..end]),
                    PageFate::Old if start >= synced_len => chooser.stale(&mut disk[start..end]),
                    PageFate::Old => {}
                    PageFate::Torn(n) => {
                        let cut = (start + n * SECTOR).min(end);
                        disk[start..cut].copy_from_slice(&inode.data[start..cut]);
                    }
                    PageFate::Sectors(mask) => {
                        for sector in 0..(PAGE as usize / SECTOR) {
                            let from = start + sector * SECTOR;
                            let to = (from + SECTOR).min(end);
                            if from < to && mask & (1 << sector) != 0 {
                                disk[from..to].copy_from_slice(&inode.data[from..to]);
                            }
                        }
                    }
                }
            }
            let len = disk.len() as u64;
            inode.allocated.retain(|&page| page * PAGE < len);
            inode.data = disk.clone();
            inode.disk = disk;
            inode.dirty.clear();
        }
    }
}

/// A power-loss policy at work.
enum Chooser {
    Nothing,
    Everything,
    Random(Rng),
    Pages(PageChooser),
}

impl Chooser {
    /// How many of a directory's unsynced changes survive.
    fn dir_prefix(&mut self, pending: usize) -> usize {
        match self {
            Self::Nothing => 0,
            Self::Everything | Self::Pages(_) => pending,
            Self::Random(rng) => rng.below(pending as u64 + 1) as usize,
        }
    }

    /// A file's size after the loss: the synced one, the latest, or (chosen by a seed) one
    /// between them at a sector boundary, as a file system that commits a size part way does.
    fn file_len(&mut self, synced: usize, latest: usize) -> usize {
        match self {
            Self::Nothing => synced,
            Self::Everything | Self::Pages(_) => latest,
            Self::Random(rng) => match rng.below(3) {
                0 => latest,
                1 => synced,
                _ => {
                    let (low, high) = (synced.min(latest), synced.max(latest));
                    let between = low + rng.below((high - low) as u64 + 1) as usize;
                    (between / SECTOR * SECTOR).clamp(low, high)
                }
            },
        }
    }

    /// What a block the file had not synced holds after the loss: zeros, or (chosen by a seed)
    /// stale bytes of whatever used the block before.
    fn stale(&mut self, bytes: &mut [u8]) {
        if let Self::Random(rng) = self
            && rng.below(3) == 0
        {
            for b in bytes.iter_mut() {
                *b = rng.next() as u8;
            }
        }
    }

    fn page(&mut self, path: &Path, page: u64) -> PageFate {
        match self {
            Self::Nothing => PageFate::Old,
            Self::Everything => PageFate::New,
            Self::Random(rng) => match rng.below(4) {
                0 => PageFate::New,
                1 => PageFate::Old,
                2 => PageFate::Torn(rng.below(PAGE / SECTOR as u64) as usize),
                _ => PageFate::Sectors(rng.next() as u8),
            },
            Self::Pages(f) => f(path, page),
        }
    }
}

impl Fs for SimFs {
    fn open(&self, path: &Path, how: Open) -> io::Result<Arc<dyn FileIo>> {
        let path = normal(path);
        let mut w = self.live()?;
        let existing = w.lookup(&path);
        let ino = match (existing, how) {
            (Some(Entry::Dir), _) => return Err(error(libc::EISDIR)),
            (Some(Entry::File(_)), Open::CreateNew) => return Err(error(libc::EEXIST)),
            (Some(Entry::File(ino)), _) => ino,
            (None, Open::Read | Open::ReadWrite) => return Err(error(libc::ENOENT)),
            (None, Open::CreateOrOpen | Open::CreateNew) => {
                Self::gate(&mut w, Op::Namespace, &path)?;
                let (parent, name) = split(&path)?;
                let ino = w.next_inode;
                w.dir_mut(&parent)?
                    .change(DirChange::Set(name, Entry::File(ino)));
                w.next_inode += 1;
                w.inodes.insert(ino, Inode::default());
                ino
            }
        };
        Ok(Arc::new(SimFile {
            fs: self.clone(),
            ino,
            path,
            writable: how != Open::Read,
        }))
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        let path = normal(path);
        let mut w = self.live()?;
        if w.lookup(&path).is_some() {
            return Err(error(libc::EEXIST));
        }
        Self::gate(&mut w, Op::Namespace, &path)?;
        let (parent, name) = split(&path)?;
        w.dir_mut(&parent)?.change(DirChange::Set(name, Entry::Dir));
        w.dirs.insert(path, Dir::default());
        Ok(())
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        let w = self.live()?;
        Ok(w.lookup(&normal(path)).is_some())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let w = self.live()?;
        let dir = w
            .dirs
            .get(&normal(path))
            .ok_or_else(|| error(libc::ENOENT))?;
        Ok(dir.entries.keys().cloned().collect())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let path = normal(path);
        let mut w = self.live()?;
        if w.lookup_file(&path).is_none() {
            return Err(error(libc::ENOENT));
        }
        Self::gate(&mut w, Op::Namespace, &path)?;
        let (parent, name) = split(&path)?;
        w.dir_mut(&parent)?.change(DirChange::Remove(name));
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from, to) = (normal(from), normal(to));
        let mut w = self.live()?;
        if w.lookup_file(&from).is_none() {
            return Err(error(libc::ENOENT));
        }
        Self::gate(&mut w, Op::Namespace, &from)?;
        let (parent, from_name) = split(&from)?;
        let (to_parent, to_name) = split(&to)?;
        if parent != to_parent {
            return Err(error(libc::EXDEV));
        }
        w.dir_mut(&parent)?
            .change(DirChange::Rename(from_name, to_name));
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let path = normal(path);
        let mut w = self.live()?;
        Self::gate(&mut w, Op::SyncDir, &path)?;
        let dir = w.dir_mut(&path)?;
        dir.durable = dir.entries.clone();
        dir.pending.clear();
        Ok(())
    }

    fn lock(&self, path: &Path) -> io::Result<Box<dyn Any + Send + Sync>> {
        let path = normal(path);
        self.open(&path, Open::CreateOrOpen)?;
        let mut w = self.live()?;
        if !w.locks.insert(path.clone()) {
            return Err(error(libc::EWOULDBLOCK));
        }
        Ok(Box::new(SimLock {
            fs: self.clone(),
            path,
        }))
    }

    fn disk_space(&self, _path: &Path) -> Option<DiskSpace> {
        let w = self.world();
        let total = w.capacity.unwrap_or(1 << 40);
        Some(DiskSpace {
            free: total.saturating_sub(w.used()),
            total,
        })
    }
}

struct SimLock {
    fs: SimFs,
    path: PathBuf,
}

impl Drop for SimLock {
    fn drop(&mut self) {
        let mut w = self.fs.world();
        if w.generation == self.fs.generation {
            w.locks.remove(&self.path);
        }
    }
}

/// An open file of a [`SimFs`].
pub struct SimFile {
    fs: SimFs,
    ino: u64,
    path: PathBuf,
    writable: bool,
}

impl fmt::Debug for SimFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimFile").field("path", &self.path).finish()
    }
}

impl SimFile {
    fn read_image(&self, buf: &mut [u8], offset: u64, uncached: bool) -> io::Result<usize> {
        let mut w = self.fs.live()?;
        let limit = match SimFs::fault(&mut w, Op::Read, &self.path) {
            Some(Action::Fail(errno) | Action::FailAfter(_, errno)) => return Err(error(errno)),
            Some(Action::Crash | Action::TearAndCrash(_)) => {
                w.crashed = true;
                return Err(crashed());
            }
            Some(Action::Short(n)) => n.max(1),
            Some(Action::CommitJournalFirst) => {
                w.commit_journal();
                usize::MAX
            }
            None => usize::MAX,
        };
        let inode = w.inodes.get(&self.ino).ok_or_else(|| error(libc::ESTALE))?;
        let start = (offset as usize).min(inode.data.len());
        let n = (inode.data.len() - start).min(buf.len()).min(limit);
        buf[..n].copy_from_slice(&inode.data[start..start + n]);
        if uncached {
            // O_DIRECT writes the dirty pages of the range to the device and reads the device:
            // clean pages come from the disk image, so pages that a failed fdatasync marked
            // clean read as what the disk holds. Nothing becomes durable by it (no cache flush).
            inode.overlay_disk(&mut buf[..n], start);
        }
        Ok(n)
    }
}

impl FileIo for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.read_image(buf, offset, false)
    }

    fn read_uncached_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.read_image(buf, offset, true)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        if !self.writable {
            return Err(error(libc::EBADF));
        }
        let mut w = self.fs.live()?;
        let mut len = buf.len();
        let mut crash_after = false;
        let mut after = None;
        match SimFs::fault(&mut w, Op::Write, &self.path) {
            Some(Action::Fail(errno)) => return Err(error(errno)),
            Some(Action::FailAfter(n, errno)) => after = Some((n, errno)),
            Some(Action::Crash) => {
                w.crashed = true;
                return Err(crashed());
            }
            Some(Action::TearAndCrash(n)) => {
                len = len.min(n);
                crash_after = true;
            }
            Some(Action::Short(n)) => len = len.min(n.max(1)),
            Some(Action::CommitJournalFirst) => w.commit_journal(),
            None => {}
        }
        let mut fail_after = None;
        if let Some((n, errno)) = after {
            len = len.min(n);
            fail_after = Some(errno);
        }
        if let Some(capacity) = w.capacity {
            let room = capacity.saturating_sub(w.used()) / PAGE;
            let inode = w.inodes.get(&self.ino).ok_or_else(|| error(libc::ESTALE))?;
            // The longest prefix whose new pages fit.
            let mut new_pages = 0;
            let mut fits = 0;
            for page in offset / PAGE..(offset + len as u64).div_ceil(PAGE) {
                if !inode.allocated.contains(&page) {
                    new_pages += 1;
                    if new_pages > room {
                        break;
                    }
                }
                fits = ((page + 1) * PAGE - offset).min(len as u64) as usize;
            }
            if fits == 0 && len > 0 {
                return Err(error(libc::ENOSPC));
            }
            if fits < len {
                len = fits;
                fail_after.get_or_insert(libc::ENOSPC);
            }
        }
        let inode = w
            .inodes
            .get_mut(&self.ino)
            .ok_or_else(|| error(libc::ESTALE))?;
        let end = offset as usize + len;
        if inode.data.len() < end {
            let from = inode.data.len() as u64;
            inode.data.resize(end, 0);
            inode.mark(from, end as u64);
        }
        inode.data[offset as usize..end].copy_from_slice(&buf[..len]);
        inode.mark(offset, end as u64);
        if len > 0 {
            inode
                .allocated
                .extend(offset / PAGE..(end as u64).div_ceil(PAGE));
        }
        if let Some(errno) = fail_after.filter(|_| !crash_after) {
            return Err(error(errno));
        }
        if crash_after {
            w.crashed = true;
            return Err(crashed());
        }
        Ok(len)
    }

    fn len(&self) -> io::Result<u64> {
        let w = self.fs.live()?;
        Ok(w.inodes.get(&self.ino).map_or(0, |i| i.data.len() as u64))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if !self.writable {
            return Err(error(libc::EBADF));
        }
        let mut w = self.fs.live()?;
        SimFs::gate(&mut w, Op::SetLen, &self.path)?;
        let old = w.inodes.get(&self.ino).map_or(0, |i| i.data.len() as u64);
        let inode = w
            .inodes
            .get_mut(&self.ino)
            .ok_or_else(|| error(libc::ESTALE))?;
        inode.data.resize(len as usize, 0);
        // Growth makes a hole; a cut frees the pages wholly past the end.
        inode.allocated.retain(|&page| page * PAGE < len);
        if old != len {
            // The pages between the two ends, and the one holding the new end, are unsynced.
            inode.mark(old.min(len) / PAGE * PAGE, old.max(len));
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut w = self.fs.live()?;
        match SimFs::fault(&mut w, Op::Sync, &self.path) {
            Some(Action::Fail(errno) | Action::FailAfter(_, errno)) => {
                // Linux after a failed writeback: the pages are clean but never reached the disk.
                if let Some(inode) = w.inodes.get_mut(&self.ino) {
                    inode.dirty.clear();
                }
                return Err(error(errno));
            }
            Some(Action::Crash | Action::TearAndCrash(_)) => {
                w.crashed = true;
                return Err(crashed());
            }
            Some(Action::CommitJournalFirst) => w.commit_journal(),
            Some(Action::Short(_)) | None => {}
        }
        let inode = w
            .inodes
            .get_mut(&self.ino)
            .ok_or_else(|| error(libc::ESTALE))?;
        inode.write_back();
        w.syncs += 1;
        Ok(())
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{read_full_at, write_all_at};

    fn file(fs: &SimFs, path: &str) -> Arc<dyn FileIo> {
        fs.open(Path::new(path), Open::CreateOrOpen).unwrap()
    }

    fn read(fs: &SimFs, path: &str) -> Option<Vec<u8>> {
        let f = fs.open(Path::new(path), Open::Read).ok()?;
        let mut buf = vec![0u8; f.len().unwrap() as usize];
        read_full_at(f.as_ref(), &mut buf, 0).unwrap();
        Some(buf)
    }

    #[test]
    fn a_process_crash_keeps_the_page_cache_and_a_power_loss_keeps_only_what_was_synced() {
        let fs = SimFs::new();
        fs.create_dir(Path::new("/d")).unwrap();
        fs.sync_dir(Path::new("/")).unwrap();
        let f = file(&fs, "/d/f");
        fs.sync_dir(Path::new("/d")).unwrap();
        write_all_at(f.as_ref(), b"synced", 0).unwrap();
        f.sync_data().unwrap();
        write_all_at(f.as_ref(), b"+not", 6).unwrap();

        let after_crash = fs.restart(Restart::ProcessCrash);
        assert!(f.len().is_err(), "handles of a dead process fail");
        assert_eq!(read(&after_crash, "/d/f").unwrap(), b"synced+not");

        let after_power = after_crash.restart(Restart::PowerLoss(PowerLoss::KeepNothing));
        assert_eq!(read(&after_power, "/d/f").unwrap(), b"synced");
    }

    #[test]
    fn an_unsynced_directory_entry_is_lost_with_the_power() {
        let fs = SimFs::new();
        let f = file(&fs, "/f");
        write_all_at(f.as_ref(), b"x", 0).unwrap();
        f.sync_data().unwrap();
        let after = fs.restart(Restart::PowerLoss(PowerLoss::KeepNothing));
        assert_eq!(read(&after, "/f"), None, "the file's name was never synced");

        let fs = after;
        let f = file(&fs, "/g");
        fs.sync_dir(Path::new("/")).unwrap();
        write_all_at(f.as_ref(), b"y", 0).unwrap();
        f.sync_data().unwrap();
        fs.rename(Path::new("/g"), Path::new("/h")).unwrap();
        let after = fs.restart(Restart::PowerLoss(PowerLoss::KeepNothing));
        assert_eq!(
            read(&after, "/g").unwrap(),
            b"y",
            "the rename was never synced"
        );
        assert_eq!(read(&after, "/h"), None);
    }

    #[test]
    fn after_a_failed_fdatasync_the_pages_look_clean_but_never_reach_the_disk() {
        let fs = SimFs::new();
        let f = file(&fs, "/f");
        fs.sync_dir(Path::new("/")).unwrap();
        write_all_at(f.as_ref(), b"lost", 0).unwrap();
        fs.inject(Fault::once(Op::Sync, "/f", 0, Action::Fail(libc::EIO)));
        assert_eq!(f.sync_data().unwrap_err().raw_os_error(), Some(libc::EIO));
        f.sync_data()
            .expect("a second fdatasync finds nothing dirty");
        let mut cached = [0u8; 4];
        assert_eq!(f.read_at(&mut cached, 0).unwrap(), 4);
        assert_eq!(&cached, b"lost");
        let mut disk = [0u8; 4];
        assert_eq!(f.read_uncached_at(&mut disk, 0).unwrap(), 4);
        assert_eq!(disk, [0; 4], "an uncached read sees the disk");
        let g = file(&fs, "/g");
        write_all_at(g.as_ref(), b"!", 0).unwrap();
        let mut dirty = [0u8; 1];
        g.read_uncached_at(&mut dirty, 0).unwrap();
        assert_eq!(
            &dirty, b"!",
            "a dirty page is written to the device and read back"
        );
        let after = fs.restart(Restart::PowerLoss(PowerLoss::KeepEverything));
        assert!(
            read(&after, "/f").unwrap() == [0; 4],
            "the lost pages stay lost"
        );
    }

    #[test]
    fn a_full_disk_fills_the_pages_it_has_then_refuses() {
        let fs = SimFs::new();
        fs.set_capacity(Some(PAGE));
        let f = file(&fs, "/f");
        let page = vec![1u8; PAGE as usize];
        assert_eq!(
            write_all_at(f.as_ref(), &[page.clone(), vec![2]].concat(), 0)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENOSPC)
        );
        assert_eq!(f.len().unwrap(), PAGE, "what fits is written");
        write_all_at(f.as_ref(), b"overwrite", 100).unwrap();
        // A hole made by set_len is not room.
        f.set_len(3 * PAGE).unwrap();
        assert!(f.write_at(b"x", 2 * PAGE).is_err());
        f.set_len(10).unwrap();
        write_all_at(f.as_ref(), &page[..4000], 10).unwrap();
    }

    #[test]
    fn a_torn_power_loss_keeps_sectors_of_a_page() {
        let fs = SimFs::new();
        let f = file(&fs, "/f");
        fs.sync_dir(Path::new("/")).unwrap();
        write_all_at(f.as_ref(), &[7u8; 2 * PAGE as usize], 0).unwrap();
        let after = fs.restart(Restart::PowerLoss(PowerLoss::Pages(Box::new(|_, page| {
            if page == 0 {
                PageFate::Torn(3)
            } else {
                PageFate::New
            }
        }))));
        let bytes = read(&after, "/f").unwrap();
        assert_eq!(bytes.len(), 2 * PAGE as usize);
        assert!(bytes[..3 * SECTOR].iter().all(|&b| b == 7));
        assert!(bytes[3 * SECTOR..PAGE as usize].iter().all(|&b| b == 0));
        assert!(bytes[PAGE as usize..].iter().all(|&b| b == 7));
    }

    #[test]
    fn a_random_power_loss_is_the_same_for_the_same_seed() {
        let run = |seed| {
            let fs = SimFs::new();
            let f = file(&fs, "/f");
            for i in 0..20u8 {
                write_all_at(f.as_ref(), &[i; 1000], u64::from(i) * 1000).unwrap();
                if i == 7 {
                    f.sync_data().unwrap();
                    fs.sync_dir(Path::new("/")).unwrap();
                }
            }
            let after = fs.restart(Restart::PowerLoss(PowerLoss::Random(seed)));
            read(&after, "/f")
        };
        assert_eq!(run(3), run(3));
        let outcomes: BTreeSet<_> = (0..20).map(run).collect();
        assert!(outcomes.len() > 3, "seeds choose different outcomes");
        for bytes in outcomes.into_iter().flatten() {
            assert!(bytes.len() >= 8000, "what was synced survives");
            assert!((0..8u8).all(|i| bytes[i as usize * 1000] == i));
        }
    }
}
