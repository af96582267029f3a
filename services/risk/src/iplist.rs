//! A list of IP ranges from a file (one CIDR range or address per line, `#` comments), kept
//! current: a background task re-reads the file when its modification time changes. A file
//! that stops parsing keeps the previous list (and says so in the log) rather than emptying
//! it.

use gatehouse_core::net::{Cidr, to_u128};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

/// How often the file's modification time is checked.
pub const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// A watched list of ranges.
pub struct IpList {
    path: PathBuf,
    ranges: RwLock<Arc<Vec<Cidr>>>,
}

/// Parses a list: one range per line; blank lines and `#` comments ignored.
pub fn parse(text: &str) -> Result<Vec<Cidr>, String> {
    let mut ranges = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        ranges.push(Cidr::parse(line).map_err(|e| format!("line {}: {e}", number + 1))?);
    }
    Ok(ranges)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl IpList {
    /// Loads `path` (an error names the file and line) and starts watching it.
    pub fn watch(path: &Path) -> Result<Arc<IpList>, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("IP list {}: {e}", path.display()))?;
        let ranges = parse(&text).map_err(|e| format!("IP list {}: {e}", path.display()))?;
        let list = Arc::new(IpList {
            path: path.to_path_buf(),
            ranges: RwLock::new(Arc::new(ranges)),
        });
        let watched = Arc::downgrade(&list);
        let mut seen = modified(path);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RELOAD_CHECK).await;
                let Some(list) = watched.upgrade() else {
                    return;
                };
                let now = modified(&list.path);
                if now != seen {
                    seen = now;
                    list.reload().await;
                }
            }
        });
        Ok(list)
    }

    async fn reload(&self) {
        let path = self.path.clone();
        let read = tokio::task::spawn_blocking(move || std::fs::read_to_string(path)).await;
        let parsed = match read {
            Ok(Ok(text)) => parse(&text),
            Ok(Err(error)) => Err(error.to_string()),
            Err(error) => Err(error.to_string()),
        };
        match parsed {
            Ok(ranges) => {
                tracing::info!(path = %self.path.display(), ranges = ranges.len(), "IP list reloaded");
                if let Ok(mut current) = self.ranges.write() {
                    *current = Arc::new(ranges);
                }
            }
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "IP list not reloaded; keeping the previous one");
            }
        }
    }

    /// Whether `ip` is in one of the ranges.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ranges = match self.ranges.read() {
            Ok(ranges) => ranges.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let ip = to_u128(ip);
        ranges.iter().any(|range| range.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_with_comments_and_name_the_bad_line() -> Result<(), String> {
        let ranges = parse("# exits\n198.51.100.0/24\n\n2001:db8::/32  # v6\n203.0.113.9\n")?;
        assert_eq!(ranges.len(), 3);
        let error = parse("198.51.100.0/24\nnot-an-ip\n")
            .err()
            .unwrap_or_default();
        assert!(error.starts_with("line 2"), "{error}");
        Ok(())
    }

    #[tokio::test]
    async fn a_changed_file_is_reloaded_and_a_broken_one_ignored() -> Result<(), String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("list.txt");
        let write = |text: &str| std::fs::write(&path, text).map_err(|e| e.to_string());
        write("198.51.100.0/24\n")?;
        let list = IpList::watch(&path)?;
        let ip = |s: &str| s.parse::<IpAddr>().map_err(|e| e.to_string());
        assert!(list.contains(ip("198.51.100.7")?));
        assert!(!list.contains(ip("203.0.113.9")?));
        // Modification times can be coarse: make sure the new one differs.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        write("203.0.113.0/24\n")?;
        tokio::time::sleep(RELOAD_CHECK * 3).await;
        assert!(list.contains(ip("203.0.113.9")?));
        assert!(!list.contains(ip("198.51.100.7")?));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        write("garbage\n")?;
        tokio::time::sleep(RELOAD_CHECK * 3).await;
        assert!(
            list.contains(ip("203.0.113.9")?),
            "a broken file keeps the old list"
        );
        Ok(())
    }
}
