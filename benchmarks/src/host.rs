//! The machine a run measured, beyond its code: how an idle CPU waits.
//!
//! On a KVM guest the cpuidle `haltpoll` driver decides what waking an idle
//! vCPU costs. With guest halt polling on (the kernel's default,
//! `guest_halt_poll_ns` 200 000) a vCPU spins up to that long before it
//! halts, so a message that comes within the window wakes it without a VM
//! exit. With it off (`haltpoll.guest_halt_poll_ns=0` on the kernel command
//! line, as on the VMs this project's figures come from) every wake-up of
//! an idle vCPU is a VM exit and an IPI. Every extra process hop pays that
//! twice, which is most of what the router's hop costs there
//! (docs/benchmarks.md, "Guest halt polling"), so the router and churn
//! reports print the policy next to their figures.

use std::fmt;
use std::path::Path;

/// How this machine's CPUs wait when idle, as far as sysfs tells.
#[derive(Debug)]
pub struct IdlePolicy {
    /// `/sys/devices/system/cpu/cpuidle/current_driver` (None: no cpuidle).
    pub driver: Option<String>,
    /// `/sys/module/haltpoll/parameters/guest_halt_poll_ns` (None: absent).
    pub guest_halt_poll_ns: Option<u64>,
}

impl IdlePolicy {
    /// Reads this machine's policy; missing or unreadable files read as None.
    pub fn read() -> Self {
        Self::read_under(Path::new("/sys"))
    }

    fn read_under(sys: &Path) -> Self {
        let text = |relative: &str| {
            std::fs::read_to_string(sys.join(relative))
                .ok()
                .map(|text| text.trim().to_string())
                .filter(|text| !text.is_empty())
        };
        IdlePolicy {
            driver: text("devices/system/cpu/cpuidle/current_driver"),
            guest_halt_poll_ns: text("module/haltpoll/parameters/guest_halt_poll_ns")
                .and_then(|ns| ns.parse().ok()),
        }
    }
}

impl fmt::Display for IdlePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.driver.as_deref(), self.guest_halt_poll_ns) {
            (Some("haltpoll"), Some(0)) => write!(
                f,
                "idle vCPUs halt at once (cpuidle haltpoll, guest_halt_poll_ns 0): every wake-up of an idle vCPU is a VM exit, tens of µs per process hop"
            ),
            (Some("haltpoll"), Some(ns)) => write!(
                f,
                "idle vCPUs poll up to {} µs before they halt (cpuidle haltpoll, guest_halt_poll_ns {ns})",
                ns / 1000
            ),
            (Some(driver), _) => write!(f, "cpuidle driver {driver}"),
            (None, _) => write!(f, "no cpuidle driver reported"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sys_with(driver: Option<&str>, poll_ns: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        if let Some(driver) = driver {
            let path = dir.path().join("devices/system/cpu/cpuidle");
            std::fs::create_dir_all(&path).expect("mkdir");
            std::fs::write(path.join("current_driver"), format!("{driver}\n")).expect("write");
        }
        if let Some(ns) = poll_ns {
            let path = dir.path().join("module/haltpoll/parameters");
            std::fs::create_dir_all(&path).expect("mkdir");
            std::fs::write(path.join("guest_halt_poll_ns"), format!("{ns}\n")).expect("write");
        }
        dir
    }

    #[test]
    fn a_guest_without_halt_polling_is_named_as_such() {
        let sys = sys_with(Some("haltpoll"), Some("0"));
        let policy = IdlePolicy::read_under(sys.path());
        assert_eq!(policy.guest_halt_poll_ns, Some(0));
        assert!(policy.to_string().contains("halt at once"), "{policy}");
    }

    #[test]
    fn a_polling_guest_reports_its_window() {
        let sys = sys_with(Some("haltpoll"), Some("200000"));
        let policy = IdlePolicy::read_under(sys.path());
        assert!(policy.to_string().contains("poll up to 200 µs"), "{policy}");
    }

    #[test]
    fn other_machines_report_their_driver_or_nothing() {
        let metal = sys_with(Some("intel_idle"), None);
        assert_eq!(
            IdlePolicy::read_under(metal.path()).to_string(),
            "cpuidle driver intel_idle"
        );
        let bare = sys_with(None, Some("not a number"));
        let policy = IdlePolicy::read_under(bare.path());
        assert_eq!(policy.guest_halt_poll_ns, None);
        assert_eq!(policy.to_string(), "no cpuidle driver reported");
    }
}
