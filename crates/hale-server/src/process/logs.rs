//! Per-agent log files: where a child's output goes, how the files are rotated, and how
//! `hale logs AGENT [-f]` reads them.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// How often [`follow`] looks at the file.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// How many polls [`follow`] waits, after seeing the file shrink, for the rotated copy of
/// a rotation in progress to appear before it treats the shrink as a plain truncation.
const FOLLOW_SHRINK_POLLS: u32 = 3;
/// How much [`tail`] reads at a time, walking backwards.
const TAIL_CHUNK: u64 = 64 * 1024;

/// The log files of one agent: `DIR/AGENT.log`, and the rotated copies `DIR/AGENT.log.1`
/// (newest) to `DIR/AGENT.log.KEEP` (oldest).
///
/// The child writes the current file itself (see [`AgentLogs::open_for_child`]) and hale
/// rotates it from outside by copy-and-truncate (see [`AgentLogs::rotate_if_needed`]),
/// because the child holds the file open for its whole life and cannot be asked to reopen
/// it. `AGENT` must be a valid agent name (no `/`), which hale's names guarantee.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentLogs {
    dir: PathBuf,
    agent: String,
    max_bytes: u64,
    keep: usize,
}

impl AgentLogs {
    /// Describes the logs of `agent` in `dir`: rotated once the current file exceeds
    /// `max_bytes`, keeping `keep` rotated copies (0 keeps none: rotation only truncates).
    /// Nothing is touched on disk until a file is opened or rotated.
    pub fn new(dir: &Path, agent: &str, max_bytes: u64, keep: usize) -> AgentLogs {
        AgentLogs { dir: dir.to_path_buf(), agent: agent.to_owned(), max_bytes, keep }
    }

    /// The current log file, `DIR/AGENT.log`, which the running incarnation appends to.
    pub fn path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.agent))
    }

    /// The rotated copy number `n` (1 is the newest), `DIR/AGENT.log.N`, so readers can
    /// find the older output.
    pub fn rotated_path(&self, n: usize) -> PathBuf {
        self.dir.join(format!("{}.log.{n}", self.agent))
    }

    /// Opens the handles a child gets as stdout and stderr: the current file, opened
    /// `O_APPEND | O_CREAT` (mode 0640 before the umask; the directory is created if
    /// missing), and a duplicate of that handle.
    ///
    /// The child writes straight to the file, with no pipe through hale, so it keeps
    /// running and logging if hale dies (a pipe would deliver `SIGPIPE` to the agent when
    /// hale went away). `O_APPEND` puts every write at the current end of the file, which
    /// is what makes copy-and-truncate rotation work: after the truncation the child's
    /// next write lands at offset 0 instead of leaving a hole of zeros.
    pub fn open_for_child(&self) -> io::Result<(File, File)> {
        fs::create_dir_all(&self.dir)?;
        let file = OpenOptions::new().append(true).create(true).mode(0o640).open(self.path())?;
        let duplicate = file.try_clone()?;
        Ok((file, duplicate))
    }

    /// Rotates the current file if it is larger than `max_bytes`; returns whether it did.
    ///
    /// This is copy-and-truncate, like logrotate's `copytruncate`: the content is copied
    /// to a staging file, the current file truncated to 0, the older copies shifted
    /// (`.1` to `.2`, ..., the one beyond `keep` dropped) and the staging file renamed to
    /// `.1`. Writers that hold the file `O_APPEND` continue at its new end (offset 0).
    /// Lines the agent writes between the end of the copy and the truncation are lost; the
    /// copy reads until the end of the file and the truncation follows at once, so the
    /// window is a few microseconds, but it exists (logrotate's `copytruncate` has it too).
    /// The rename to `.1` comes last, so a reader that sees a new `.1` knows the
    /// truncation has happened ([`follow`] relies on it).
    ///
    /// It blocks on file I/O (at most one copy of `max_bytes` and a few renames). Call it
    /// from one place at a time per agent.
    pub fn rotate_if_needed(&self) -> io::Result<bool> {
        let current = self.path();
        let len = match fs::metadata(&current) {
            Ok(meta) => meta.len(),
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(error) => return Err(error),
        };
        if len <= self.max_bytes {
            return Ok(false);
        }
        let truncator = OpenOptions::new().write(true).open(&current)?;
        if self.keep == 0 {
            truncator.set_len(0)?;
            return Ok(true);
        }
        let staging = self.dir.join(format!("{}.log.rotating", self.agent));
        let mut source = File::open(&current)?;
        let mut copy = OpenOptions::new().write(true).create(true).truncate(true).mode(0o640).open(&staging)?;
        io::copy(&mut source, &mut copy)?;
        truncator.set_len(0)?;
        for n in (1..self.keep).rev() {
            match fs::rename(self.rotated_path(n), self.rotated_path(n + 1)) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
        }
        fs::rename(&staging, self.rotated_path(1))?;
        Ok(true)
    }

    /// The files to read, newest first: the current one, then `.1` to `.keep`.
    fn newest_first(&self) -> Vec<PathBuf> {
        std::iter::once(self.path()).chain((1..=self.keep).map(|n| self.rotated_path(n))).collect()
    }
}

/// The last `lines` lines of an agent's output, for `hale logs AGENT`: from the current
/// file and, when it holds fewer, from as many rotated copies as needed (oldest first in
/// the result, as they were written).
///
/// A last line without a final newline counts as a line. Bytes that are not UTF-8 are
/// replaced (U+FFFD) rather than failing: an agent may print anything. The files are read
/// backwards in chunks, so a large file costs only what is shown. If a rotation shrinks a
/// file while it is read, the read is retried (twice), then the best effort is returned.
pub fn tail(logs: &AgentLogs, lines: usize) -> io::Result<String> {
    if lines == 0 {
        return Ok(String::new());
    }
    let paths = logs.newest_first();
    let mut attempts = 0;
    loop {
        let (bytes, consistent) = last_lines(&paths, lines)?;
        attempts += 1;
        if consistent || attempts == 3 {
            return Ok(String::from_utf8_lossy(&bytes).into_owned());
        }
    }
}

/// The last `lines` lines of the concatenation of `paths` (given newest first), and
/// whether every file read was as long as its size said (false: it shrank meanwhile).
fn last_lines(paths: &[PathBuf], lines: usize) -> io::Result<(Vec<u8>, bool)> {
    let mut pieces = Vec::new(); // newest first
    let mut newlines = 0;
    let mut at_end = true;
    let mut consistent = true;
    'files: for path in paths {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error),
        };
        let mut end = file.metadata()?.len();
        while end > 0 {
            let start = end.saturating_sub(TAIL_CHUNK);
            let mut chunk = vec![0; (end - start) as usize];
            let read = read_at_most(&file, &mut chunk, start)?;
            if read < chunk.len() {
                consistent = false;
                chunk.truncate(read);
            }
            for i in (0..chunk.len()).rev() {
                // The newline that ends the last line does not start another one.
                let last_byte = std::mem::replace(&mut at_end, false);
                if chunk[i] == b'\n' && !last_byte {
                    newlines += 1;
                    if newlines == lines {
                        pieces.push(chunk.split_off(i + 1));
                        break 'files;
                    }
                }
            }
            pieces.push(chunk);
            end = start;
        }
    }
    pieces.reverse();
    Ok((pieces.concat(), consistent))
}

/// Reads into `buf` from `offset` until it is full or the file ends; returns how much.
fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

/// Follows an agent's output, for `hale logs AGENT -f`: hands every byte appended to the
/// current file after offset `from_len` to `out`, as it comes, until the future is dropped.
///
/// It polls the file every 200 ms (a log is read by a person; inotify would add a
/// dependency and an fd per follower for no visible gain). It copes with rotation: when a
/// new `.1` appears (which [`AgentLogs::rotate_if_needed`] renames into place only after
/// truncating), the end of the old content not yet shown is read from `.1`, then the
/// current file from 0. A file that shrinks with no new `.1` (truncated by hand, or
/// `keep` = 0) is read from 0 after a few polls. What cannot be seen by polling is not
/// shown: bytes lost in rotation's window, and a file truncated and refilled past the
/// old offset between two polls. It fails only on I/O errors other than a missing file
/// (a missing file reads as empty: the agent may not have started yet).
pub async fn follow(logs: &AgentLogs, from_len: u64, mut out: impl FnMut(&[u8]) + Send) -> io::Result<()> {
    let current = logs.path();
    let rotated = logs.rotated_path(1);
    let mut offset = from_len;
    let mut rotated_seen = file_identity(&rotated).await?;
    let mut shrunk_polls = 0;
    let mut buf = vec![0; 64 * 1024];
    loop {
        // The length first, `.1` second: rotation renames `.1` after truncating, so if `.1`
        // is unchanged now, the length read before it is not from a rotated-away file
        // that has been refilled since.
        let len = match tokio::fs::metadata(&current).await {
            Ok(meta) => meta.len(),
            Err(error) if error.kind() == io::ErrorKind::NotFound => 0,
            Err(error) => return Err(error),
        };
        let rotated_now = file_identity(&rotated).await?;
        if rotated_now.is_some() && rotated_now != rotated_seen {
            // Rotated (and truncated) since the last poll: the rest of what we were reading
            // is in `.1`, and everything in the current file is new.
            rotated_seen = rotated_now;
            copy_from(&rotated, offset, &mut buf, &mut out).await?;
            offset = copy_from(&current, 0, &mut buf, &mut out).await?;
            shrunk_polls = 0;
        } else if len < offset && shrunk_polls + 1 < FOLLOW_SHRINK_POLLS {
            // A rotation may be between its truncation and its rename: wait for `.1`.
            shrunk_polls += 1;
        } else {
            if len < offset {
                offset = 0;
            }
            shrunk_polls = 0;
            if len > offset {
                offset += copy_from(&current, offset, &mut buf, &mut out).await?;
            }
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }
}

/// The (device, inode) of a file, or `None` if there is none: tells a freshly rotated
/// `.1` from the one seen before.
async fn file_identity(path: &Path) -> io::Result<Option<(u64, u64)>> {
    match tokio::fs::metadata(path).await {
        Ok(meta) => Ok(Some((meta.dev(), meta.ino()))),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

/// Hands the bytes of `path` from `offset` to its current end to `out`; returns how many.
async fn copy_from(path: &Path, offset: u64, buf: &mut [u8], out: &mut (impl FnMut(&[u8]) + Send)) -> io::Result<u64> {
    let mut file = match tokio::fs::File::open(path).await {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(error) => return Err(error),
    };
    file.seek(io::SeekFrom::Start(offset)).await?;
    let mut copied = 0;
    loop {
        let read = file.read(buf).await?;
        if read == 0 {
            return Ok(copied);
        }
        out(&buf[..read]);
        copied += read as u64;
    }
}
