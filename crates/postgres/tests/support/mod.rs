//! A throwaway PostgreSQL cluster for tests: `initdb` and `pg_ctl` run as the `postgres` user
//! (PostgreSQL refuses root) in a temporary directory, listening only on a Unix socket there.
//! Dropping it stops that cluster, by its data directory, and nothing else.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    options: String,
}

/// The binaries of the newest PostgreSQL installed from Debian's packages.
fn binaries() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| {
            dirs.filter_map(|d| d.ok())
                .map(|d| d.path().join("bin"))
                .filter(|bin| bin.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
        .pop()
        .expect("PostgreSQL is not installed: `apt-get install postgresql` (.ci/run installs it)")
}

fn as_postgres(bin: &Path, program: &str, args: &[&str]) {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join(program))
        .args(args)
        .output()
        .expect("runuser runs");
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Cluster {
    /// Starts a cluster. Needs root, to run PostgreSQL as `postgres`.
    pub fn start() -> Self {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the PostgreSQL tests start a cluster as the postgres user, which needs root"
        );
        let bin = binaries();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sock")).unwrap();
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success());
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        as_postgres(
            &bin,
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        let options = format!(
            "-k {} -c listen_addresses='' -c fsync=off -c max_connections=50",
            sock.display()
        );
        let cluster = Self { dir, bin, options };
        cluster.resume();
        cluster
    }

    /// Starts the stopped cluster again, on the same socket.
    pub fn resume(&self) {
        let data = self.dir.path().join("data");
        let log = data.join("log");
        as_postgres(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &self.options,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
    }

    /// Stops the cluster as an operator's restart does (`-m fast`: sessions are ended, what
    /// was committed stays).
    pub fn stop(&self) {
        let data = self.dir.path().join("data");
        as_postgres(
            &self.bin,
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-m", "fast", "-w", "stop"],
        );
    }

    /// A `postgres://` URL for `database` over the cluster's socket (the socket's directory
    /// percent-encoded as the host), as `skald serve --store` takes it.
    pub fn postgres_url(&self, database: &str) -> String {
        let socket = self.dir.path().join("sock").display().to_string();
        format!(
            "postgres://postgres@{}/{database}",
            socket.replace('/', "%2F")
        )
    }

    /// A connection string for `database` over the cluster's socket.
    pub fn url(&self, database: &str) -> String {
        format!(
            "host={} user=postgres dbname={database}",
            self.dir.path().join("sock").display()
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args([
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output();
    }
}
