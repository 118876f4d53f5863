//! The storage I/O seam: every effect the engine has on files goes through [`Fs`] and
//! [`FileIo`], so that tests can replace the operating system with
//! [`crate::sim::SimFs`] and fail, cut short or lose any of them ("The storage I/O seam" in
//! `docs/storage.md`). [`RealFs`] is the operating system.

use std::any::Any;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// How a file is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Open {
    /// Read only; the file must exist.
    Read,
    /// Read and write; the file must exist.
    ReadWrite,
    /// Read and write, creating the file when it is missing.
    CreateOrOpen,
    /// Read and write a new file; fails with `AlreadyExists` if there is one.
    CreateNew,
}

/// Free and total bytes of the disk holding a path, as an unprivileged writer sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskSpace {
    /// Bytes free for an unprivileged writer.
    pub free: u64,
    /// Bytes in all.
    pub total: u64,
}

/// What the engine asks of the file system.
pub trait Fs: Send + Sync + fmt::Debug + 'static {
    /// Opens a file.
    fn open(&self, path: &Path, how: Open) -> io::Result<Arc<dyn FileIo>>;
    /// Creates one directory, whose parent must exist; `AlreadyExists` when it does.
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    /// Whether something exists at `path`.
    fn exists(&self, path: &Path) -> io::Result<bool>;
    /// The names of the entries of a directory, in no particular order.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Renames a file within its directory, replacing any file of the new name.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes a directory's entries durable (`fsync` of the directory).
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Takes an exclusive lock on the file at `path` (created when missing), held until the
    /// returned value is dropped; `WouldBlock` when another holder has it.
    fn lock(&self, path: &Path) -> io::Result<Box<dyn Any + Send + Sync>>;
    /// The space on the disk holding `path`, when known.
    fn disk_space(&self, path: &Path) -> Option<DiskSpace>;
}

/// What the engine asks of one open file. Every offset is absolute (positional I/O only).
pub trait FileIo: Send + Sync + fmt::Debug {
    /// Reads up to `buf.len()` bytes at `offset`; fewer only at the end of the file or when the
    /// system returns a short read. `Ok(0)` at or past the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// As [`FileIo::read_at`], but from the disk itself, past the page cache (`O_DIRECT`)
    /// where the file system allows it; otherwise through the cache.
    fn read_uncached_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes up to `buf.len()` bytes at `offset`, returning how many were written.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize>;
    /// The file's length.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file holds no bytes.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Cuts or extends (with zeros) the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// `fdatasync`: the file's data, and the metadata needed to read it, on disk.
    fn sync_data(&self) -> io::Result<()>;
    /// `fsync`: the file's data and all its metadata on disk.
    fn sync_all(&self) -> io::Result<()>;
    /// The path it was opened at, for messages.
    fn path(&self) -> &Path;
}

/// Reads `buf.len()` bytes at `offset`, or fewer only at the end of the file. Returns the count.
pub fn read_full_at(file: &dyn FileIo, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    read_loop(buf, offset, |b, o| file.read_at(b, o))
}

/// [`read_full_at`] past the page cache ([`FileIo::read_uncached_at`]).
pub fn read_full_uncached_at(file: &dyn FileIo, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    read_loop(buf, offset, |b, o| file.read_uncached_at(b, o))
}

fn read_loop(
    buf: &mut [u8],
    offset: u64,
    mut read: impl FnMut(&mut [u8], u64) -> io::Result<usize>,
) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match read(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Writes all of `buf` at `offset`.
pub fn write_all_at(file: &dyn FileIo, buf: &[u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.write_at(&buf[done..], offset + done as u64) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the file system wrote nothing",
                ));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Creates `path` and every missing ancestor, syncing the parent of each directory created so
/// that its entry survives a power loss.
pub fn create_dir_all_durably(fs: &dyn Fs, path: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut at = Some(path);
    while let Some(dir) = at {
        if dir.as_os_str().is_empty() || fs.exists(dir)? {
            break;
        }
        missing.push(dir.to_path_buf());
        at = dir.parent();
    }
    for dir in missing.iter().rev() {
        match fs.create_dir(dir) {
            Ok(()) => {}
            // Made by someone else in between: its entry is theirs to sync, ours to sync too.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs.sync_dir(&parent)?;
    }
    Ok(())
}

/// The operating system's file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

impl Fs for RealFs {
    fn open(&self, path: &Path, how: Open) -> io::Result<Arc<dyn FileIo>> {
        let mut options = OpenOptions::new();
        options.read(true);
        match how {
            Open::Read => {}
            Open::ReadWrite => {
                options.write(true);
            }
            Open::CreateOrOpen => {
                options.write(true).create(true);
            }
            Open::CreateNew => {
                options.write(true).create_new(true);
            }
        }
        let file = options.open(path)?;
        Ok(Arc::new(RealFile {
            file,
            path: path.to_path_buf(),
            direct: OnceLock::new(),
        }))
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    fn lock(&self, path: &Path) -> io::Result<Box<dyn Any + Send + Sync>> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        // SAFETY: flock on a file descriptor we own; no memory is shared with the kernel.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Box::new(file))
    }

    fn disk_space(&self, path: &Path) -> Option<DiskSpace> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
        // SAFETY: statvfs fills the zeroed struct we own from a NUL-terminated path.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(path.as_ptr(), &mut stat) };
        (rc == 0).then(|| DiskSpace {
            free: stat.f_bavail as u64 * stat.f_frsize as u64,
            total: stat.f_blocks as u64 * stat.f_frsize as u64,
        })
    }
}

/// The alignment `O_DIRECT` asks of offsets, lengths and buffers (a multiple of every logical
/// block size in use).
const DIRECT_ALIGN: usize = 4096;

/// A file of the operating system.
pub struct RealFile {
    file: File,
    path: PathBuf,
    /// A second descriptor opened with `O_DIRECT` on first use; `None` when the file system
    /// refuses it.
    direct: OnceLock<Option<File>>,
}

impl fmt::Debug for RealFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RealFile")
            .field("path", &self.path)
            .finish()
    }
}

impl RealFile {
    fn direct(&self) -> Option<&File> {
        self.direct
            .get_or_init(|| {
                OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&self.path)
                    .ok()
            })
            .as_ref()
    }

    /// One `O_DIRECT` read covering `buf` at `offset`, through an aligned bounce buffer. `None`
    /// when the file system refuses it.
    fn read_direct(&self, direct: &File, buf: &mut [u8], offset: u64) -> Option<io::Result<usize>> {
        let start = offset - offset % DIRECT_ALIGN as u64;
        let skip = (offset - start) as usize;
        let len = (skip + buf.len()).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let mut bounce = AlignedBuf::new(len);
        let n = match direct.read_at(bounce.as_mut(), start) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return None,
            Err(e) => return Some(Err(e)),
        };
        let got = n.saturating_sub(skip).min(buf.len());
        buf[..got].copy_from_slice(&bounce.as_mut()[skip..skip + got]);
        Some(Ok(got))
    }
}

impl FileIo for RealFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    fn read_uncached_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if let Some(direct) = self.direct()
            && let Some(result) = self.read_direct(direct, buf, offset)
        {
            return result;
        }
        self.file.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.file.write_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// A heap buffer aligned for `O_DIRECT`.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.max(DIRECT_ALIGN), DIRECT_ALIGN)
            .expect("a 4 KiB alignment and a length below isize::MAX make a valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = std::ptr::NonNull::new(ptr) else {
            std::alloc::handle_alloc_error(layout)
        };
        Self { ptr, layout }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised (zeroed) bytes we own.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// redb's file, reached through the seam: redb's own page checksums and commit protocol on top
/// of whatever [`FileIo`] the store was opened with. It takes no lock; the store's `LOCK` file
/// keeps other processes out. A failed `fdatasync` is remembered in `sync_failed`: after one,
/// the page cache may hold index pages the disk never got, so the file must not be opened
/// again in this process (`index::IndexDb`).
#[derive(Debug)]
pub struct IndexBackend {
    pub file: Arc<dyn FileIo>,
    pub sync_failed: Arc<std::sync::atomic::AtomicBool>,
}

impl redb::StorageBackend for IndexBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.file.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let n = read_full_at(self.file.as_ref(), out, offset)?;
        if n < out.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} ends at byte {}",
                    self.file.path().display(),
                    offset + n as u64
                ),
            ));
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.file.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let synced = self.file.sync_data();
        if synced.is_err() {
            self.sync_failed
                .store(true, std::sync::atomic::Ordering::Release);
        }
        synced
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        write_all_at(self.file.as_ref(), data, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncached_reads_return_what_cached_reads_return_at_any_offset_and_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = RealFs.open(&path, Open::Read).unwrap();
        for (offset, len) in [(0, 10), (1, 4096), (4095, 2), (5000, 9000), (19_990, 100)] {
            let mut a = vec![0u8; len];
            let mut b = vec![0u8; len];
            let na = read_full_at(file.as_ref(), &mut a, offset).unwrap();
            let nb = read_full_uncached_at(file.as_ref(), &mut b, offset).unwrap();
            assert_eq!(na, nb, "offset {offset} length {len}");
            assert_eq!(a[..na], b[..nb], "offset {offset} length {len}");
            assert_eq!(a[..na], bytes[offset as usize..offset as usize + na]);
        }
    }

    #[test]
    fn create_dir_all_durably_makes_every_missing_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a").join("b").join("c");
        create_dir_all_durably(&RealFs, &deep).unwrap();
        assert!(deep.is_dir());
        create_dir_all_durably(&RealFs, &deep).unwrap();
    }
}
