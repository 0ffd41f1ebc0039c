//! A power-loss filesystem, after Jepsen's LazyFS: a FUSE filesystem whose
//! file contents are held as a page cache would hold them, so a test can cut
//! the power — drop every write that was not fsynced — and restart the
//! servers on what a real disk would have kept.
//!
//! Each regular file has two copies of its bytes: what processes read and
//! write (the page cache) and what the "disk" holds, which becomes a copy of
//! the first at `fsync`/`fdatasync` (only the range written since the last
//! one is copied). [`LazyFs::drop_unsynced`] is the power cut: every file
//! reverts to its last synced bytes, size included.
//!
//! The semantics, as LazyFS has them:
//! - **Data** (`write`, `truncate`, `fallocate`) is lost unless the file is
//!   fsynced afterwards. `close` does not sync. A file created and never
//!   fsynced comes back empty (0 bytes), not absent.
//! - **Names** (`create`, `mkdir`, `rename`, `unlink`, `rmdir`, `link`,
//!   `symlink`) take effect at once and survive the cut, as on a journaling
//!   filesystem after its journal commit: a renamed file keeps its new name
//!   and the *content* of the inode it names reverts. So the classic unsafe
//!   update — write a temporary file, rename it over the old one, no fsync —
//!   leaves an empty file after the cut, as ext4 can.
//! - **Metadata** (mode, owner, times) is not rolled back.
//!
//! Everything lives in memory and is gone when the handle drops (the
//! filesystem is unmounted then): it is meant for a test's server data
//! directory of some megabytes. Mounting needs `/dev/fuse` and root (the
//! kernel mount is done directly) or `fusermount3` (Debian's `fuse3`,
//! which `scripts/install-deps.sh` installs).

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use fuser::{
    BackgroundSession, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

/// Attributes and names are never cached by the kernel: after a power cut
/// a file's size changes under it, and the next look must see that.
const TTL: Duration = Duration::ZERO;
const ROOT: u64 = 1;
const BLOCK: u32 = 4096;

/// A mounted power-loss filesystem; unmounted (and its contents gone) when
/// dropped.
pub struct LazyFs {
    state: Arc<Mutex<State>>,
    session: Option<BackgroundSession>,
    mountpoint: tempfile::TempDir,
}

/// What a power cut dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Files whose content reverted (they had writes since their last fsync).
    pub files: usize,
    /// Bytes written since the last fsync that no longer exist, counted
    /// over each reverted file's written range.
    pub bytes: u64,
}

impl LazyFs {
    /// Mounts a fresh, empty filesystem on a new temporary directory.
    pub fn mount() -> anyhow::Result<Self> {
        let mountpoint =
            tempfile::tempdir().context("creating the lazy filesystem's mountpoint")?;
        if !Path::new("/dev/fuse").exists() {
            anyhow::bail!(
                "the power-loss filesystem needs FUSE and /dev/fuse is missing: load the `fuse` \
                 kernel module (`modprobe fuse`) or run the test where FUSE is available"
            );
        }
        let state = Arc::new(Mutex::new(State::new()));
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::FSName("agentmesh-lazyfs".to_owned()),
            MountOption::Subtype("lazyfs".to_owned()),
            MountOption::RW,
            MountOption::Async,
        ];
        let session = fuser::spawn_mount(Lazy(state.clone()), mountpoint.path(), &config)
            .with_context(|| {
                format!(
                    "mounting the power-loss filesystem (FUSE) on {}: run as root, or install \
                     Debian's `fuse3` (`scripts/install-deps.sh`) for `fusermount3`",
                    mountpoint.path().display()
                )
            })?;
        Ok(Self {
            state,
            session: Some(session),
            mountpoint,
        })
    }

    /// Where the filesystem is mounted.
    pub fn path(&self) -> &Path {
        self.mountpoint.path()
    }

    /// The power cut: every file reverts to the bytes it had at its last
    /// fsync (a file never fsynced becomes empty). Kill the processes that
    /// write here first, as a power cut would.
    pub fn drop_unsynced(&self) -> Dropped {
        lock(&self.state).drop_unsynced()
    }

    /// Writes everything back, as the kernel's periodic writeback does with
    /// pages dirty for longer than 30 s (`vm.dirty_expire_centisecs`): a
    /// test calls it for what was written long before the power cut it
    /// models (a server's schema, its streams), which a real disk would
    /// hold by then. Returns the bytes it synced.
    pub fn sync_all(&self) -> u64 {
        let mut state = lock(&self.state);
        let mut synced = 0;
        for node in state.nodes.values_mut() {
            if let Kind::File(content) = &mut node.kind {
                synced += content.dirty.map_or(0, |(lo, hi)| hi - lo);
                content.sync();
            }
        }
        synced
    }

    /// Bytes written and not yet fsynced, over all files.
    pub fn unsynced_bytes(&self) -> u64 {
        lock(&self.state)
            .nodes
            .values()
            .filter_map(|n| match &n.kind {
                Kind::File(f) => f.dirty.map(|(lo, hi)| hi - lo),
                _ => None,
            })
            .sum()
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        if let Some(session) = self.session.take()
            && session.umount_and_join().is_err()
        {
            // Still busy (a process of the test holds a file open): detach
            // it, so no dead mount outlives the test.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.mountpoint.path())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The filesystem's inodes.
struct State {
    nodes: BTreeMap<u64, Node>,
    next_ino: u64,
}

struct Node {
    kind: Kind,
    perm: u16,
    uid: u32,
    gid: u32,
    nlink: u32,
    open: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
}

enum Kind {
    Dir {
        parent: u64,
        entries: BTreeMap<OsString, u64>,
    },
    File(Content),
    Symlink(PathBuf),
}

/// A regular file's bytes: what processes see, what the disk holds, and the
/// range written since the last fsync.
#[derive(Default)]
struct Content {
    data: Vec<u8>,
    synced: Vec<u8>,
    dirty: Option<(u64, u64)>,
}

impl Content {
    fn mark(&mut self, lo: u64, hi: u64) {
        if lo >= hi {
            return;
        }
        self.dirty = Some(match self.dirty {
            Some((a, b)) => (a.min(lo), b.max(hi)),
            None => (lo, hi),
        });
    }

    fn write(&mut self, offset: u64, bytes: &[u8]) {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(bytes.len());
        let old = self.data.len();
        if end > old {
            self.data.resize(end, 0);
        }
        self.data[start..end].copy_from_slice(bytes);
        // A write past the end also writes the zeros of the gap.
        self.mark(offset.min(old as u64), end as u64);
    }

    fn resize(&mut self, size: u64) {
        let old = self.data.len() as u64;
        self.data
            .resize(usize::try_from(size).unwrap_or(usize::MAX), 0);
        self.mark(old.min(size), old.max(size));
    }

    fn sync(&mut self) {
        if let Some((lo, hi)) = self.dirty.take() {
            let len = self.data.len();
            self.synced.resize(len, 0);
            let lo = usize::try_from(lo).unwrap_or(usize::MAX).min(len);
            let hi = usize::try_from(hi).unwrap_or(usize::MAX).min(len);
            self.synced[lo..hi].copy_from_slice(&self.data[lo..hi]);
        }
    }

    /// Reverts to the synced bytes; the bytes dropped, if any were.
    fn revert(&mut self) -> Option<u64> {
        let (lo, hi) = self.dirty.take()?;
        self.data.clone_from(&self.synced);
        Some(hi - lo)
    }
}

impl State {
    fn new() -> Self {
        let mut nodes = BTreeMap::new();
        nodes.insert(
            ROOT,
            Node::new(
                Kind::Dir {
                    parent: ROOT,
                    entries: BTreeMap::new(),
                },
                0o755,
                0,
                0,
            ),
        );
        Self {
            nodes,
            next_ino: ROOT + 1,
        }
    }

    fn drop_unsynced(&mut self) -> Dropped {
        let mut dropped = Dropped::default();
        for node in self.nodes.values_mut() {
            if let Kind::File(content) = &mut node.kind
                && let Some(bytes) = content.revert()
            {
                dropped.files += 1;
                dropped.bytes += bytes;
            }
        }
        dropped
    }

    fn node(&self, ino: INodeNo) -> Result<&Node, Errno> {
        self.nodes.get(&ino.0).ok_or(Errno::ENOENT)
    }

    fn node_mut(&mut self, ino: INodeNo) -> Result<&mut Node, Errno> {
        self.nodes.get_mut(&ino.0).ok_or(Errno::ENOENT)
    }

    fn entries(&self, dir: u64) -> Result<&BTreeMap<OsString, u64>, Errno> {
        match &self.nodes.get(&dir).ok_or(Errno::ENOENT)?.kind {
            Kind::Dir { entries, .. } => Ok(entries),
            _ => Err(Errno::ENOTDIR),
        }
    }

    fn entries_mut(&mut self, dir: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match &mut self.nodes.get_mut(&dir).ok_or(Errno::ENOENT)?.kind {
            Kind::Dir { entries, .. } => Ok(entries),
            _ => Err(Errno::ENOTDIR),
        }
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<u64, Errno> {
        self.entries(parent.0)?
            .get(name)
            .copied()
            .ok_or(Errno::ENOENT)
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let node = self.nodes.get(&ino).ok_or(Errno::ENOENT)?;
        let (kind, size) = match &node.kind {
            Kind::Dir { entries, .. } => (FileType::Directory, entries.len() as u64),
            Kind::File(c) => (FileType::RegularFile, c.data.len() as u64),
            Kind::Symlink(target) => (FileType::Symlink, target.as_os_str().len() as u64),
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: node.atime,
            mtime: node.mtime,
            ctime: node.ctime,
            crtime: node.ctime,
            kind,
            perm: node.perm,
            nlink: node.nlink,
            uid: node.uid,
            gid: node.gid,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        })
    }

    /// Adds `kind` as `name` in `parent`.
    fn insert(
        &mut self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        kind: Kind,
        perm: u16,
    ) -> Result<FileAttr, Errno> {
        if self.entries(parent.0)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let is_dir = matches!(kind, Kind::Dir { .. });
        self.nodes
            .insert(ino, Node::new(kind, perm, req.uid(), req.gid()));
        self.entries_mut(parent.0)?.insert(name.to_owned(), ino);
        let dir = self.node_mut(parent)?;
        if is_dir {
            dir.nlink += 1;
        }
        dir.touch();
        self.attr(ino)
    }

    /// One name of `ino` is gone: frees it when no name and no open handle
    /// remain.
    fn unlinked(&mut self, ino: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            let dir = matches!(node.kind, Kind::Dir { .. });
            node.nlink = if dir { 0 } else { node.nlink.saturating_sub(1) };
            node.ctime = SystemTime::now();
            if node.nlink == 0 && node.open == 0 {
                self.nodes.remove(&ino);
            }
        }
    }

    fn remove(&mut self, parent: INodeNo, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let ino = self.child(parent, name)?;
        match (&self.nodes.get(&ino).ok_or(Errno::ENOENT)?.kind, dir) {
            (Kind::Dir { entries, .. }, true) if !entries.is_empty() => {
                return Err(Errno::ENOTEMPTY);
            }
            (Kind::Dir { .. }, true) => {}
            (Kind::Dir { .. }, false) => return Err(Errno::EISDIR),
            (_, true) => return Err(Errno::ENOTDIR),
            (_, false) => {}
        }
        self.entries_mut(parent.0)?.remove(name);
        let p = self.node_mut(parent)?;
        if dir {
            p.nlink = p.nlink.saturating_sub(1);
        }
        p.touch();
        self.unlinked(ino);
        Ok(())
    }

    /// Whether `ino` is `ancestor` or lies below it.
    fn is_within(&self, mut ino: u64, ancestor: u64) -> bool {
        loop {
            if ino == ancestor {
                return true;
            }
            match self.nodes.get(&ino).map(|n| &n.kind) {
                Some(Kind::Dir { parent, .. }) if *parent != ino => ino = *parent,
                _ => return false,
            }
        }
    }

    fn set_parent(&mut self, ino: u64, new_parent: u64) {
        if let Some(Node {
            kind: Kind::Dir { parent, .. },
            ..
        }) = self.nodes.get_mut(&ino)
        {
            *parent = new_parent;
        }
    }

    fn is_dir(&self, ino: u64) -> bool {
        matches!(
            self.nodes.get(&ino).map(|n| &n.kind),
            Some(Kind::Dir { .. })
        )
    }

    fn rename(
        &mut self,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        let source = self.child(parent, name)?;
        let target = self.entries(newparent.0)?.get(newname).copied();
        if self.is_dir(source) && self.is_within(newparent.0, source) {
            return Err(Errno::EINVAL);
        }
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            let target = target.ok_or(Errno::ENOENT)?;
            if self.is_dir(target) && self.is_within(parent.0, target) {
                return Err(Errno::EINVAL);
            }
            self.entries_mut(parent.0)?.insert(name.to_owned(), target);
            self.entries_mut(newparent.0)?
                .insert(newname.to_owned(), source);
            self.set_parent(source, newparent.0);
            self.set_parent(target, parent.0);
            self.fix_dir_links(parent.0, newparent.0, source, target);
            return Ok(());
        }
        if let Some(target) = target {
            if target == source {
                return Ok(());
            }
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            match (self.is_dir(source), self.is_dir(target)) {
                (true, true) => {
                    if !self.entries(target)?.is_empty() {
                        return Err(Errno::ENOTEMPTY);
                    }
                    let p = self.node_mut(newparent)?;
                    p.nlink = p.nlink.saturating_sub(1);
                }
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (false, false) => {}
            }
            self.unlinked(target);
        }
        self.entries_mut(parent.0)?.remove(name);
        self.entries_mut(newparent.0)?
            .insert(newname.to_owned(), source);
        if self.is_dir(source) && parent != newparent {
            self.set_parent(source, newparent.0);
            self.node_mut(parent)?.nlink -= 1;
            self.node_mut(newparent)?.nlink += 1;
        }
        self.node_mut(parent)?.touch();
        self.node_mut(newparent)?.touch();
        if let Ok(node) = self.node_mut(INodeNo(source)) {
            node.ctime = SystemTime::now();
        }
        Ok(())
    }

    /// After an exchange across directories, each directory's link count
    /// follows the subdirectories it now holds.
    fn fix_dir_links(&mut self, a: u64, b: u64, now_in_b: u64, now_in_a: u64) {
        if a == b {
            return;
        }
        let delta = |dir: bool| i64::from(dir);
        let into_b = delta(self.is_dir(now_in_b)) - delta(self.is_dir(now_in_a));
        for (dir, change) in [(b, into_b), (a, -into_b)] {
            if let Some(node) = self.nodes.get_mut(&dir) {
                node.nlink = u32::try_from(i64::from(node.nlink) + change).unwrap_or(node.nlink);
            }
        }
    }

    fn file(&mut self, ino: INodeNo) -> Result<&mut Content, Errno> {
        match &mut self.node_mut(ino)?.kind {
            Kind::File(content) => Ok(content),
            Kind::Dir { .. } => Err(Errno::EISDIR),
            Kind::Symlink(_) => Err(Errno::EINVAL),
        }
    }
}

impl Node {
    fn new(kind: Kind, perm: u16, uid: u32, gid: u32) -> Self {
        let now = SystemTime::now();
        let nlink = if matches!(kind, Kind::Dir { .. }) {
            2
        } else {
            1
        };
        Self {
            kind,
            perm,
            uid,
            gid,
            nlink,
            open: 0,
            atime: now,
            mtime: now,
            ctime: now,
        }
    }

    fn touch(&mut self) {
        let now = SystemTime::now();
        self.mtime = now;
        self.ctime = now;
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

fn perm(mode: u32, umask: u32) -> u16 {
    u16::try_from(mode & !umask & 0o7777).unwrap_or(0o644)
}

/// The FUSE side: every request takes the state's lock.
struct Lazy(Arc<Mutex<State>>);

impl Lazy {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.0)
    }
}

fn entry(reply: ReplyEntry, result: Result<FileAttr, Errno>) {
    match result {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn empty(reply: ReplyEmpty, result: Result<(), Errno>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for Lazy {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let state = self.state();
        entry(reply, state.child(parent, name).and_then(|i| state.attr(i)));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state().attr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut state = self.state();
        let result = (|| {
            if let Some(size) = size {
                state.file(ino)?.resize(size);
                state.node_mut(ino)?.touch();
            }
            let node = state.node_mut(ino)?;
            if let Some(mode) = mode {
                node.perm = perm(mode, 0);
            }
            if let Some(uid) = uid {
                node.uid = uid;
            }
            if let Some(gid) = gid {
                node.gid = gid;
            }
            if let Some(t) = atime {
                node.atime = time(t);
            }
            if let Some(t) = mtime {
                node.mtime = time(t);
            }
            node.ctime = SystemTime::now();
            state.attr(ino.0)
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.state().node(ino).map(|n| &n.kind) {
            Ok(Kind::Symlink(target)) => {
                reply.data(std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str()));
            }
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc_s_ifmt() != libc_s_ifreg() {
            // Only regular files: the servers under test make no devices,
            // pipes or sockets here.
            reply.error(Errno::EPERM);
            return;
        }
        let result = self.state().insert(
            req,
            parent,
            name,
            Kind::File(Content::default()),
            perm(mode, umask),
        );
        entry(reply, result);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let kind = Kind::Dir {
            parent: parent.0,
            entries: BTreeMap::new(),
        };
        let result = self
            .state()
            .insert(req, parent, name, kind, perm(mode, umask));
        entry(reply, result);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.state().remove(parent, name, false));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.state().remove(parent, name, true));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let result = self.state().insert(
            req,
            parent,
            link_name,
            Kind::Symlink(target.to_owned()),
            0o777,
        );
        entry(reply, result);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        empty(
            reply,
            self.state().rename(parent, name, newparent, newname, flags),
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let mut state = self.state();
        let result = (|| {
            if state.is_dir(ino.0) {
                return Err(Errno::EPERM);
            }
            state.node(ino)?;
            if state.entries(newparent.0)?.contains_key(newname) {
                return Err(Errno::EEXIST);
            }
            state
                .entries_mut(newparent.0)?
                .insert(newname.to_owned(), ino.0);
            state.node_mut(newparent)?.touch();
            let node = state.node_mut(ino)?;
            node.nlink += 1;
            node.ctime = SystemTime::now();
            state.attr(ino.0)
        })();
        entry(reply, result);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut state = self.state();
        let result = (|| {
            if flags.0 & libc_o_trunc() != 0 {
                state.file(ino)?.resize(0);
            }
            state.node_mut(ino)?.open += 1;
            Ok(())
        })();
        match result {
            // No FOPEN_KEEP_CACHE: each open drops the kernel's cached pages,
            // so a server started after a power cut reads what is left.
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut state = self.state();
        match state.file(ino) {
            Ok(content) => {
                let len = content.data.len();
                let start = usize::try_from(offset).unwrap_or(usize::MAX).min(len);
                let end = start.saturating_add(size as usize).min(len);
                reply.data(&content.data[start..end]);
            }
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut state = self.state();
        let result = (|| {
            state.file(ino)?.write(offset, data);
            state.node_mut(ino)?.touch();
            Ok(())
        })();
        match result {
            Ok(()) => reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX)),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) does not sync.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut state = self.state();
        if let Some(node) = state.nodes.get_mut(&ino.0) {
            node.open = node.open.saturating_sub(1);
            if node.open == 0 && node.nlink == 0 {
                state.nodes.remove(&ino.0);
            }
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.state().file(ino).map(Content::sync));
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let state = self.state();
        let (parent, entries) = match state.node(ino).map(|n| &n.kind) {
            Ok(Kind::Dir { parent, entries }) => (*parent, entries),
            Ok(_) => return reply.error(Errno::ENOTDIR),
            Err(e) => return reply.error(e),
        };
        let dots = [
            (ino.0, FileType::Directory, OsStr::new(".")),
            (parent, FileType::Directory, OsStr::new("..")),
        ];
        let children = entries.iter().map(|(name, &child)| {
            let kind = match state.nodes.get(&child).map(|n| &n.kind) {
                Some(Kind::Dir { .. }) => FileType::Directory,
                Some(Kind::Symlink(_)) => FileType::Symlink,
                _ => FileType::RegularFile,
            };
            (child, kind, name.as_os_str())
        });
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (child, kind, name)) in dots.into_iter().chain(children).enumerate().skip(skip) {
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Names are durable at once (see the module's documentation).
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // Servers check free space before they write (JetStream sizes its
        // store from it): report a roomy disk.
        let blocks = (64u64 << 30) / u64::from(BLOCK);
        reply.statfs(blocks, blocks, blocks, 1 << 20, 1 << 20, BLOCK, 255, BLOCK);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut state = self.state();
        let result = state.insert(
            req,
            parent,
            name,
            Kind::File(Content::default()),
            perm(mode, umask),
        );
        match result {
            Ok(attr) => {
                if let Some(node) = state.nodes.get_mut(&attr.ino.0) {
                    node.open += 1;
                }
                reply.created(
                    &TTL,
                    &attr,
                    Generation(0),
                    FileHandle(0),
                    FopenFlags::empty(),
                );
            }
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if mode != 0 {
            reply.error(Errno::EOPNOTSUPP);
            return;
        }
        let mut state = self.state();
        let result = state.file(ino).map(|content| {
            let end = offset.saturating_add(length);
            if end > content.data.len() as u64 {
                content.resize(end);
            }
        });
        empty(reply, result);
    }
}

// The few constants of <fcntl.h> and <sys/stat.h> the filesystem reads, as
// Linux defines them (this crate does not link `libc` for three numbers).
const fn libc_s_ifmt() -> u32 {
    0o170_000
}

const fn libc_s_ifreg() -> u32 {
    0o100_000
}

const fn libc_o_trunc() -> i32 {
    0o1000
}

#[cfg(test)]
mod tests {
    use std::fs::{self, File, OpenOptions};
    use std::io::{Read, Seek, SeekFrom, Write};

    use super::*;

    fn read(path: &Path) -> Vec<u8> {
        let mut bytes = Vec::new();
        File::open(path).unwrap().read_to_end(&mut bytes).unwrap();
        bytes
    }

    #[test]
    fn content_keeps_only_the_synced_range() {
        let mut c = Content::default();
        c.write(0, b"hello");
        c.sync();
        c.write(3, b"LO world");
        assert_eq!(c.data, b"helLO world");
        assert_eq!(c.revert(), Some(8));
        assert_eq!(c.data, b"hello");
        assert_eq!(c.revert(), None, "nothing left to drop");

        // A write past the end syncs its zero gap too; a truncation is
        // data like any write.
        c.write(8, b"!");
        c.sync();
        assert_eq!(c.synced, b"hello\0\0\0!");
        c.resize(2);
        assert_eq!(c.revert(), Some(7));
        assert_eq!(c.data, b"hello\0\0\0!");
        c.resize(2);
        c.sync();
        c.resize(4);
        c.sync();
        assert_eq!(c.synced, b"he\0\0");
    }

    #[test]
    fn a_power_cut_keeps_the_synced_bytes_and_drops_the_rest() {
        let fs = LazyFs::mount().unwrap();
        let path = fs.path().join("store.blk");
        let mut file = File::create(&path).unwrap();
        file.write_all(b"synced.").unwrap();
        file.sync_all().unwrap();
        file.write_all(b" lost").unwrap();
        // fdatasync is a sync too.
        let other = fs.path().join("other.blk");
        let mut second = File::create(&other).unwrap();
        second.write_all(b"kept").unwrap();
        second.sync_data().unwrap();
        // close does not sync.
        let never = fs.path().join("never-synced.tmp");
        fs::write(&never, b"gone").unwrap();
        assert_eq!(read(&path), b"synced. lost");
        assert_eq!(fs.unsynced_bytes(), 5 + 4);

        let dropped = fs.drop_unsynced();
        assert_eq!(dropped, Dropped { files: 2, bytes: 9 });
        assert_eq!(read(&path), b"synced.");
        assert_eq!(fs::metadata(&path).unwrap().len(), 7);
        assert_eq!(read(&other), b"kept");
        // A file never synced keeps its name and loses its content.
        assert_eq!(read(&never), b"");
        assert_eq!(fs.unsynced_bytes(), 0);

        // The kernel's writeback of old pages: everything is kept.
        fs::write(&never, b"written back").unwrap();
        assert_eq!(fs.sync_all(), 12);
        assert_eq!(fs.drop_unsynced(), Dropped::default());
        assert_eq!(read(&never), b"written back");

        // An open handle sees the reverted file too, and writes go on.
        file.seek(SeekFrom::End(0)).unwrap();
        file.write_all(b" again").unwrap();
        file.sync_all().unwrap();
        fs.drop_unsynced();
        assert_eq!(read(&path), b"synced. again");
    }

    #[test]
    fn names_survive_a_power_cut_and_contents_follow_their_inode() {
        let fs = LazyFs::mount().unwrap();
        let dir = fs.path().join("stream/msgs");
        fs::create_dir_all(&dir).unwrap();
        let target = dir.join("index.db");
        fs::write(&target, b"old").unwrap();
        File::open(&target).unwrap().sync_all().unwrap();

        // The unsafe update: a temporary file renamed over the target with
        // no fsync comes back empty.
        let tmp = dir.join("index.tmp");
        fs::write(&tmp, b"new").unwrap();
        fs::rename(&tmp, &target).unwrap();
        // The safe one: fsync before the rename keeps the new bytes.
        let safe_tmp = dir.join("meta.tmp");
        let safe = dir.join("meta.inf");
        fs::write(&safe_tmp, b"meta").unwrap();
        File::open(&safe_tmp).unwrap().sync_all().unwrap();
        fs::rename(&safe_tmp, &safe).unwrap();
        // An unlink is durable at once.
        let removed = dir.join("1.blk");
        fs::write(&removed, b"x").unwrap();
        File::open(&removed).unwrap().sync_all().unwrap();
        fs::remove_file(&removed).unwrap();
        // A hard link names the same content.
        fs::hard_link(&safe, dir.join("meta.link")).unwrap();

        fs.drop_unsynced();
        assert_eq!(read(&target), b"");
        assert!(!tmp.exists());
        assert_eq!(read(&safe), b"meta");
        assert_eq!(read(&dir.join("meta.link")), b"meta");
        assert!(!removed.exists());
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["index.db", "meta.inf", "meta.link"]);

        // Directories: rename, non-empty rmdir refused, into itself refused.
        let moved = fs.path().join("moved");
        fs::rename(fs.path().join("stream"), &moved).unwrap();
        assert_eq!(read(&moved.join("msgs/meta.inf")), b"meta");
        let error = fs::remove_dir(moved.join("msgs")).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(39), "ENOTEMPTY: {error}");
        assert!(fs::rename(&moved, moved.join("msgs/inside")).is_err());
        // Truncating open (O_TRUNC) and appending.
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(moved.join("log"))
            .unwrap();
        log.write_all(b"a").unwrap();
        log.write_all(b"b").unwrap();
        log.sync_all().unwrap();
        assert_eq!(read(&moved.join("log")), b"ab");
        File::create(moved.join("log")).unwrap();
        assert_eq!(read(&moved.join("log")), b"");
        fs.drop_unsynced();
        assert_eq!(read(&moved.join("log")), b"ab");
    }
}
