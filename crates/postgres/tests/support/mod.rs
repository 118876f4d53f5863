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
    /// The port, which also names the socket file.
    port: u16,
    /// The network namespace PostgreSQL runs in, if not this process's.
    netns: Option<String>,
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

/// Runs a PostgreSQL program as the `postgres` user, inside network namespace `netns` if one
/// is given.
fn as_postgres_in(netns: Option<&str>, bin: &Path, program: &str, args: &[&str]) {
    let mut command = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "runuser"]);
            c
        }
        None => Command::new("runuser"),
    };
    let out = command
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

fn as_postgres(bin: &Path, program: &str, args: &[&str]) {
    as_postgres_in(None, bin, program, args);
}

impl Cluster {
    /// Starts a cluster. Needs root, to run PostgreSQL as `postgres`.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Starts a cluster inside network namespace `netns`, listening on `address` port 5432
    /// (and on its socket), trusting clients from `clients` (a CIDR block).
    pub fn start_in_netns(netns: &str, address: &str, clients: &str) -> Self {
        let mut cluster = Self::init();
        cluster.netns = Some(netns.to_owned());
        let data = cluster.dir.path().join("data");
        let hba = data.join("pg_hba.conf");
        let mut rules = std::fs::read_to_string(&hba).unwrap();
        rules.push_str(&format!("host all all {clients} trust\n"));
        std::fs::write(&hba, rules).unwrap();
        cluster.options = format!(
            "-k {} -c listen_addresses={address} -c fsync=off -c max_connections=50",
            cluster.dir.path().join("sock").display()
        );
        cluster.resume();
        cluster
    }

    /// A new cluster's directories and `initdb`, not started.
    fn init() -> Self {
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
        Self {
            dir,
            bin,
            options: String::new(),
            port: 5432,
            netns: None,
        }
    }

    /// Starts a cluster that also listens on 127.0.0.1 at the returned port, accepting TCP
    /// connections only over TLS with this certificate chain and key (PEM).
    pub fn start_with_tls(cert_pem: &str, key_pem: &str) -> (Self, u16) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        (Self::start_with(Some((cert_pem, key_pem, port))), port)
    }

    fn start_with(tls: Option<(&str, &str, u16)>) -> Self {
        let mut cluster = Self::init();
        let data = cluster.dir.path().join("data");
        let sock = cluster.dir.path().join("sock");
        let mut options = format!(
            "-k {} -c listen_addresses='' -c fsync=off -c max_connections=50",
            sock.display()
        );
        if let Some((cert, key, port)) = tls {
            let write = |name: &str, text: &str| {
                let path = data.join(name);
                std::fs::write(&path, text).unwrap();
                let status = Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(&path)
                    .status()
                    .unwrap();
                assert!(status.success());
                path
            };
            let cert = write("server.crt", cert);
            let key = write("server.key", key);
            let status = Command::new("chmod").arg("600").arg(&key).status().unwrap();
            assert!(status.success());
            // TCP only over TLS; the socket stays open to the tests.
            write(
                "pg_hba.conf",
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n\
                 hostnossl all all 127.0.0.1/32 reject\n",
            );
            options = format!(
                "-k {} -c listen_addresses=127.0.0.1 -p {port} -c fsync=off \
                 -c max_connections=50 -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                sock.display(),
                cert.display(),
                key.display()
            );
        }
        cluster.port = tls.map_or(5432, |(_, _, port)| port);
        cluster.options = options;
        cluster.resume();
        cluster
    }

    /// Starts the stopped cluster again, on the same socket.
    pub fn resume(&self) {
        let data = self.dir.path().join("data");
        let log = data.join("log");
        as_postgres_in(
            self.netns.as_deref(),
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
            "postgres://postgres@{}:{}/{database}",
            socket.replace('/', "%2F"),
            self.port
        )
    }

    /// A connection to the cluster's `postgres` database, for what a test does as its
    /// administrator.
    pub async fn admin(&self) -> skald_postgres::tokio_postgres::Client {
        let url = skald_postgres::PgUrl::parse(&self.url("postgres")).unwrap();
        skald_postgres::connect(&url).await.unwrap()
    }

    /// Creates database `name` and returns where it is, over the cluster's socket.
    pub async fn database(&self, name: &str) -> skald_postgres::PgUrl {
        self.admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        skald_postgres::PgUrl::parse(&self.url(name)).unwrap()
    }

    /// A connection string for `database` over the cluster's socket.
    pub fn url(&self, database: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={database}",
            self.dir.path().join("sock").display(),
            self.port
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
