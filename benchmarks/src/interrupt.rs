//! Ctrl-C and SIGTERM. The components a run starts live in process groups
//! of their own (so a terminal's Ctrl-C reaches only the bench), and a run
//! interrupted without this left its clusters running. On either signal
//! the bench stops every process it started (each child's whole group:
//! SIGTERM, SIGKILL after a grace), says so, and exits.

use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};

/// Waits for Ctrl-C or SIGTERM and returns the signal's name.
pub async fn signalled() -> &'static str {
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return "SIGINT";
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// A child of `parent` from its `/proc/PID/stat` line: its PID and whether
/// it leads a process group of its own. None for any other process, and
/// for a zombie (already exited).
fn child_of(stat: &str, parent: u32) -> Option<(u32, bool)> {
    let (head, rest) = stat.rsplit_once(')')?;
    let pid: u32 = head.split_whitespace().next()?.parse().ok()?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    let ppid: u32 = fields.next()?.parse().ok()?;
    let pgrp: u32 = fields.next()?.parse().ok()?;
    (ppid == parent && state != "Z").then_some((pid, pgrp == pid))
}

/// This process's living children.
fn children() -> Vec<(u32, bool)> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|stat| child_of(&stat, me))
        .collect()
}

fn kill(signal: &str, (pid, leads): (u32, bool)) {
    let target = match leads {
        true => format!("-{pid}"),
        false => pid.to_string(),
    };
    let _ = std::process::Command::new("kill")
        .args([signal, "--", &target])
        .status();
}

/// Whether `pid` still runs (a zombie has exited).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// SIGTERM to each of `targets` (a group leader's whole group), SIGKILL
/// to them all once `grace` is over or every leader has exited.
async fn stop(targets: &[(u32, bool)], grace: Duration) {
    for &target in targets {
        kill("-TERM", target);
    }
    let deadline = Instant::now() + grace;
    while targets.iter().any(|(pid, _)| alive(*pid)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The rest of a group (a component run under strace) goes too.
    for &target in targets {
        kill("-KILL", target);
    }
}

/// Stops every process this one started, with `grace` before SIGKILL.
/// Returns how many there were.
pub async fn stop_children(grace: Duration) -> usize {
    let started = children();
    stop(&started, grace).await;
    started.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_told_from_its_stat_line() {
        let leader = "4242 (kube-apiserver) S 100 4242 4242 0 -1 4194560";
        assert_eq!(child_of(leader, 100), Some((4242, true)));
        // A name with spaces and parentheses, in the parent's group.
        let member = "4243 (a (b) c) R 100 100 100 0 -1";
        assert_eq!(child_of(member, 100), Some((4243, false)));
        assert_eq!(child_of(leader, 101), None);
        let zombie = "4244 (etcd) Z 100 4244 4244 0 -1";
        assert_eq!(child_of(zombie, 100), None);
        assert_eq!(child_of("garbage", 100), None);
    }

    #[tokio::test]
    async fn stop_ends_a_child_in_its_own_group() {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .process_group(0)
            .spawn()
            .expect("sleep");
        let pid = child.id();
        // Only this test's child: other tests in this process may have theirs.
        assert!(children().contains(&(pid, true)));
        stop(&[(pid, true)], Duration::from_secs(5)).await;
        assert!(!alive(pid), "stopped within the grace");
        let status = child.wait().expect("wait");
        assert!(!status.success(), "sleep 600 was stopped, not finished");
    }
}
