//! Who keeps a block device busy, so a server can refuse to remove a device in use and say why.
//!
//! Three places name users: mounts (`/proc/self/mountinfo`), stacked devices
//! (`/sys/block/<dev>/holders`, e.g. device mapper or md) and open file descriptors
//! (`/proc/<pid>/fd`). A mount in another mount namespace appears in none of them for us, but it
//! holds the device exclusively, so when nothing was found an `O_EXCL` open tells us.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    Mount { mount_point: PathBuf, fs_type: String },
    /// Another block device built on this one (`dm-0`, `md0`, ...).
    Stacked { name: String },
    Process { pid: u32, command: String },
    /// Held exclusively by something not visible here (a mount in another mount namespace).
    Exclusive,
}

/// Reads after "in use by": "in use by a mount on /mnt (ext4)".
impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Mount { mount_point, fs_type } => write!(f, "a mount on {} ({fs_type})", mount_point.display()),
            Holder::Stacked { name } => write!(f, "block device {name}"),
            Holder::Process { pid, command } => write!(f, "process {pid} ({command})"),
            Holder::Exclusive => f.write_str("an exclusive holder (a mount in another mount namespace?)"),
        }
    }
}

/// Everything that holds block device `path` (the node in /dev); empty when it is unused.
pub fn holders(path: &Path) -> io::Result<Vec<Holder>> {
    let meta = fs::metadata(path)?;
    if !meta.file_type().is_block_device() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a block device", path.display())));
    }
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let mut found = mounts(&fs::read_to_string("/proc/self/mountinfo")?, major, minor);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if let Ok(entries) = fs::read_dir(Path::new("/sys/block").join(&name).join("holders")) {
        found.extend(entries.flatten().map(|e| Holder::Stacked { name: e.file_name().to_string_lossy().into_owned() }));
    }
    found.extend(processes(rdev));
    if found.is_empty() && held_exclusively(path)? {
        found.push(Holder::Exclusive);
    }
    Ok(found)
}

/// Mounts of device `major:minor` in a mountinfo text (proc(5): field 3 is the device, field 5
/// the mount point with octal escapes, the filesystem type follows the " - " separator).
fn mounts(mountinfo: &str, major: u32, minor: u32) -> Vec<Holder> {
    let device = format!("{major}:{minor}");
    mountinfo
        .lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let fields: Vec<&str> = mount.split(' ').collect();
            let mount_point = fields.get(4)?;
            (fields.get(2) == Some(&device.as_str())).then(|| Holder::Mount {
                mount_point: PathBuf::from(unescape(mount_point)),
                fs_type: fs.split(' ').next().unwrap_or("?").to_owned(),
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| std::str::from_utf8(d).ok()).and_then(|d| u8::from_str_radix(d, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Processes (other than this one) with the device open.
fn processes(rdev: u64) -> Vec<Holder> {
    let me = std::process::id();
    let Ok(procs) = fs::read_dir("/proc") else { return Vec::new() };
    let mut found = Vec::new();
    for pid in procs.flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()) {
        if pid == me {
            continue;
        }
        // Processes come and go, and others' fds may be unreadable: skip what we cannot see.
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        let holds = fds.flatten().any(|fd| {
            fs::metadata(fd.path()).is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == rdev)
        });
        if holds {
            let command = fs::read_to_string(format!("/proc/{pid}/comm")).map(|c| c.trim().to_owned()).unwrap_or_default();
            found.push(Holder::Process { pid, command });
        }
    }
    found
}

/// Whether an exclusive open is refused (EBUSY): a filesystem or another claimer has it.
fn held_exclusively(path: &Path) -> io::Result<bool> {
    match fs::File::options().read(true).custom_flags(libc::O_EXCL).open(path) {
        Ok(_) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(true),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
98 22 259:3 / /mnt/with\\040space rw,relatime shared:50 - ext4 /dev/ublkb0 rw
99 22 259:3 /sub /srv/bind rw,relatime shared:50 - ext4 /dev/ublkb0 rw
100 22 259:30 / /mnt/other rw - xfs /dev/ublkb3 rw
";

    #[test]
    fn mounts_of_the_device_are_named_with_their_mount_points() {
        assert_eq!(
            mounts(MOUNTINFO, 259, 3),
            [
                Holder::Mount { mount_point: "/mnt/with space".into(), fs_type: "ext4".into() },
                Holder::Mount { mount_point: "/srv/bind".into(), fs_type: "ext4".into() },
            ]
        );
        assert_eq!(mounts(MOUNTINFO, 259, 4), []);
        assert_eq!(unescape("a\\134b\\011c"), "a\\b\tc");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn only_block_devices_are_examined() {
        let err = holders(Path::new("/dev/null")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        assert!(err.to_string().contains("not a block device"), "{err}");
    }
}
