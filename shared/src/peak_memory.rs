//! The process's resident memory and its high-water mark, for per-round reports and benches.
//!
//! Linux exposes both in `/proc/self/status` (`VmRSS`, `VmHWM`) and lets a process reset the
//! high-water mark by writing `5` to `/proc/self/clear_refs`; elsewhere these report `None`.
//! No crate reads `VmHWM` and resets it, hence these few lines.

/// Resets the peak to the current resident size; `false` where the OS does not support it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The most memory resident at once since start (or the last [`reset_peak_rss`]), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|kib| kib * 1024)
}

/// Memory resident now, in bytes.
pub fn current_rss_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|kib| kib * 1024)
}

fn status_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_covers_an_allocation_and_resets() {
        let Some(before) = current_rss_bytes() else {
            eprintln!("SKIPPED: no /proc/self/status");
            return;
        };
        let block = vec![1u8; 64 << 20];
        std::hint::black_box(&block);
        let peak = peak_rss_bytes().unwrap();
        assert!(peak >= before + (60 << 20), "peak {peak} before {before}");
        drop(block);
        if reset_peak_rss() {
            assert!(peak_rss_bytes().unwrap() < peak);
        }
    }
}
