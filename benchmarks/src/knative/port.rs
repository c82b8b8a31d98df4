//! Whether a TCP port can be listened on here, and if not, which process
//! listens on it (Linux `/proc`): Knative's autoscaler binds its stat
//! server to the constant `:8080`, and when that fails it cancels its own
//! root context at once, which shows only as "context canceled" and "has
//! stopped leading" in its log (`cmd/autoscaler/main.go`'s errgroup).

use std::path::Path;

/// Whether a listener on every address can take `port` now (with
/// SO_REUSEADDR, as Go's listeners: a closed socket in TIME_WAIT does not
/// hold it).
pub fn free(port: u16) -> bool {
    std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
}

/// The processes listening on `port` (pid and command line), from
/// `/proc/net/tcp{,6}` and each process's open sockets; empty when none
/// is found or `/proc` cannot tell.
pub fn listeners(port: u16) -> Vec<String> {
    let proc_root = Path::new("/proc");
    let mut inodes = Vec::new();
    for table in ["net/tcp", "net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(proc_root.join(table)) {
            inodes.extend(listening_inodes(&text, port));
        }
    }
    if inodes.is_empty() {
        return Vec::new();
    }
    let Ok(processes) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for process in processes.flatten() {
        let Ok(pid) = process.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| {
                let target = target.to_string_lossy();
                inodes
                    .iter()
                    .any(|inode| target == format!("socket:[{inode}]"))
            })
        });
        if holds {
            let cmdline = std::fs::read(process.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            found.push(format!("pid {pid}: {}", cmdline.trim()));
        }
    }
    found
}

/// The inodes of the sockets in a `/proc/net/tcp` table listening on
/// `port` (state 0A).
fn listening_inodes(table: &str, port: u16) -> Vec<String> {
    let wanted = format!("{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1)?.rsplit(':').next()?;
            (local_port == wanted && *fields.get(3)? == "0A")
                .then(|| fields.get(9).map(|s| s.to_string()))?
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tables_listening_sockets_on_the_port_are_found() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0000000000000000 100 0 0 10 0
";
        // Only the listener on 8080 (0x1F90), not the connection to it nor 8081.
        assert_eq!(listening_inodes(table, 8080), ["4242"]);
        assert!(listening_inodes(table, 9090).is_empty());
    }

    #[test]
    fn a_port_this_process_listens_on_is_not_free_and_names_this_process() {
        let listener = std::net::TcpListener::bind(("0.0.0.0", 0)).expect("an ephemeral port");
        let port = listener.local_addr().expect("its address").port();
        assert!(!free(port));
        let holders = listeners(port);
        let me = format!("pid {}:", std::process::id());
        assert!(holders.iter().any(|h| h.starts_with(&me)), "{holders:?}");
        drop(listener);
        assert!(free(port));
    }
}
