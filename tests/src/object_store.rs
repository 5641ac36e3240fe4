//! The backup engine and a real S3 server for backup tests, installed on first use from PyPI into
//! `<testbed>/` (a fresh machine has neither):
//! - barman-cloud (the pins of `images/pg-instance/barman-requirements.txt`, the same file the
//!   `pg-instance` image installs) into `barman-<version>-<hash of the pins>/`, with one small
//!   launcher per `barman-cloud-*` command in its `bin/` that any user can run (the PostgreSQL
//!   user runs `barman-cloud-wal-restore` as its `restore_command`);
//! - moto's S3 server (`moto[server]`) into `moto-<version>/`, run by [`S3Server`] on a free
//!   loopback port and stopped on drop.
//!
//! Installs are serialized with a lock file so that parallel tests do not race.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;

use crate::paths;
use crate::process::{ChildGuard, die_with_parent};
use crate::tcp_proxy::TcpProxy;

/// The pins of barman-cloud and every package it imports (`name==version` a line), installed with
/// `pip install --no-deps -r`: the one source of these versions, shared with the `pg-instance`
/// image (`images/pg-instance/Dockerfile` installs the same file).
pub const BARMAN_REQUIREMENTS: &str =
    include_str!("../../images/pg-instance/barman-requirements.txt");
/// Where [`BARMAN_REQUIREMENTS`] lives in the workspace (the Dockerfile copies it from there).
pub const BARMAN_REQUIREMENTS_PATH: &str = "images/pg-instance/barman-requirements.txt";
/// moto version whose S3 server the tests run.
pub const MOTO: &str = "5.2.5";

/// The barman-cloud commands and the Python module each launcher runs.
pub const BARMAN_COMMANDS: &[(&str, &str)] = &[
    (
        "barman-cloud-wal-archive",
        "barman.clients.cloud_walarchive",
    ),
    (
        "barman-cloud-wal-restore",
        "barman.clients.cloud_walrestore",
    ),
    ("barman-cloud-backup", "barman.clients.cloud_backup"),
    (
        "barman-cloud-backup-list",
        "barman.clients.cloud_backup_list",
    ),
    (
        "barman-cloud-backup-show",
        "barman.clients.cloud_backup_show",
    ),
    (
        "barman-cloud-backup-delete",
        "barman.clients.cloud_backup_delete",
    ),
    ("barman-cloud-restore", "barman.clients.cloud_restore"),
    (
        "barman-cloud-check-wal-archive",
        "barman.clients.cloud_check_wal_archive",
    ),
];

/// A Python interpreter that imports barman, beside the commands: the instance manager's
/// long-lived WAL uploader runs on it (one process for many files, where
/// `barman-cloud-wal-archive` starts Python for each).
pub const BARMAN_PYTHON: &str = "barman-cloud-python";

/// The version [`BARMAN_REQUIREMENTS`] pins for `package` (extras ignored).
pub fn pinned_version(package: &str) -> Option<&'static str> {
    BARMAN_REQUIREMENTS
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once("=="))
        .find(|(name, _)| name.split('[').next() == Some(package))
        .map(|(_, version)| version.trim())
}

/// The launchers of a barman install whose packages are in `lib`: each `barman-cloud-*` command
/// and [`BARMAN_PYTHON`], as (file name, `/bin/sh` script). `python3` from PATH: the PostgreSQL
/// user may not read the installing interpreter's folder (pyenv under /root), and the shell
/// skips PATH entries it cannot execute. The image's Dockerfile writes the same ones.
pub fn launchers(lib: &Path) -> Vec<(String, String)> {
    let lib = lib.display();
    BARMAN_COMMANDS
        .iter()
        .map(|(command, module)| {
            (
                command.to_string(),
                format!("#!/bin/sh\nPYTHONPATH='{lib}' exec python3 -m {module} \"$@\"\n"),
            )
        })
        .chain(std::iter::once((
            BARMAN_PYTHON.to_string(),
            format!("#!/bin/sh\nPYTHONPATH='{lib}' exec python3 \"$@\"\n"),
        )))
        .collect()
}

/// FNV-1a of the pins and the launchers' shape: a new pin (or launcher) is a new install folder.
fn install_key() -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let launchers: String = launchers(Path::new("lib"))
        .into_iter()
        .map(|(name, script)| name + &script)
        .collect();
    for byte in BARMAN_REQUIREMENTS.bytes().chain(launchers.bytes()) {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:08x}", hash >> 32)
}

/// An exclusive lock on `<testbed>/.<name>.lock`, held until the file is dropped.
pub(crate) fn lock(name: &str) -> anyhow::Result<fs::File> {
    let dir = paths::testbed_dir();
    fs::create_dir_all(&dir)?;
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!(".{name}.lock")))?;
    // SAFETY: flock on a file descriptor we own; released when the file is closed.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) };
    if rc != 0 {
        bail!("locking {name}: {}", std::io::Error::last_os_error());
    }
    Ok(file)
}

fn pip_install(target: &Path, packages: &[&str]) -> anyhow::Result<()> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(target)
        .args(packages)
        .status()
        .with_context(|| format!("running pip ({python} -m pip) to install {packages:?}"))?;
    if !status.success() {
        bail!("pip install of {packages:?} failed ({status})");
    }
    // Readable by the unprivileged PostgreSQL user.
    let status = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(target)
        .status()?;
    if !status.success() {
        bail!("chmod -R a+rX {} failed", target.display());
    }
    Ok(())
}

/// Folder holding the `barman-cloud-*` launchers (what `pg-instance --barman-bin` takes):
/// `$BARMAN_BIN`, or the pinned install, installed now when missing.
pub fn barman_bin() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("BARMAN_BIN") {
        return Ok(PathBuf::from(bin));
    }
    // The folder names every pin: an install of other versions is not reused.
    let barman = pinned_version("barman").unwrap_or("unpinned");
    let root = paths::testbed_dir().join(format!("barman-{barman}-{}", install_key()));
    let bin = root.join("bin");
    let marker = root.join(".installed");
    if marker.exists() {
        return Ok(bin);
    }
    let _lock = lock("barman")?;
    if marker.exists() {
        return Ok(bin);
    }
    let lib = root.join("lib");
    fs::create_dir_all(&root)?;
    let requirements = root.join("requirements.txt");
    fs::write(&requirements, BARMAN_REQUIREMENTS)?;
    pip_install(
        &lib,
        &["--no-deps", "-r", &requirements.display().to_string()],
    )?;
    fs::create_dir_all(&bin)?;
    for (name, script) in launchers(&lib) {
        let path = bin.join(name);
        fs::write(&path, script)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    }
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755))?;
    fs::write(&marker, "")?;
    Ok(bin)
}

/// Folder holding moto's server (`PYTHONPATH`), installed now when missing.
pub fn moto_dir() -> anyhow::Result<PathBuf> {
    let root = paths::testbed_dir().join(format!("moto-{MOTO}"));
    let marker = root.join(".installed");
    if marker.exists() {
        return Ok(root);
    }
    let _lock = lock("moto")?;
    if marker.exists() {
        return Ok(root);
    }
    pip_install(&root, &[&format!("moto[server]=={MOTO}")])?;
    fs::write(&marker, "")?;
    Ok(root)
}

/// Installs barman-cloud and moto (what `cargo xtask setup` calls).
pub fn install() -> anyhow::Result<()> {
    barman_bin()?;
    moto_dir()?;
    Ok(())
}

/// Access key the tests give the S3 server's clients (moto accepts any credentials).
pub const ACCESS_KEY_ID: &str = "backup-test-key";
/// Secret key of the tests (never printed by the code under test).
pub const SECRET_ACCESS_KEY: &str = "backup-test-secret-9f27";

/// An `Authorization` header moto (without IAM) takes as an authenticated request.
const ANY_SIGNATURE: &str = "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00";

/// The access key an IAM-checking [`S3Server`] accepts.
#[derive(Clone)]
pub struct IamKey {
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
}

impl std::fmt::Debug for IamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IamKey")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// A real S3 server (moto) on a free loopback port, reached through a [`TcpProxy`] so that a
/// test can cut it off ([`S3Server::cut`]) without losing its data (moto keeps it in memory);
/// stopped on drop.
pub struct S3Server {
    host: std::net::IpAddr,
    port: u16,
    tls: bool,
    proxy: TcpProxy,
    process: ChildGuard,
    log: PathBuf,
    recording: PathBuf,
}

/// One request the S3 server received while recording ([`S3Server::start_recording`]).
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// HTTP method.
    pub method: String,
    /// URL as received (the path of a path-style request names the bucket).
    pub url: String,
    /// `Host` header (a virtual-hosted-style request puts the bucket there).
    pub host: String,
    /// `Authorization` header (SigV4: its credential scope names the region).
    pub authorization: String,
}

impl RecordedRequest {
    /// The URL's path and query (`/<bucket>/<key>` for a path-style request).
    pub fn path(&self) -> &str {
        match self.url.split_once("://") {
            Some((_, rest)) => rest.find('/').map_or("/", |at| &rest[at..]),
            None => &self.url,
        }
    }
}

impl S3Server {
    /// Starts the server and waits until it answers.
    pub fn start(log_dir: &Path) -> anyhow::Result<Self> {
        Self::start_on(log_dir, std::net::Ipv4Addr::LOCALHOST.into())
    }

    /// Starts the server listening on `host` (a pod bridge's gateway address, say, which pods
    /// reach where they cannot reach the host's loopback) and waits until it answers.
    pub fn start_on(log_dir: &Path, host: std::net::IpAddr) -> anyhow::Result<Self> {
        Self::spawn(log_dir, host, &[])
    }

    /// Starts a server on `host` that checks credentials as AWS does (IAM users, keys, policies
    /// and request signatures: a wrong key id or secret is refused with `InvalidAccessKeyId` or
    /// `SignatureDoesNotMatch`), with `buckets` created; the one key it accepts.
    ///
    /// moto enforces authentication after `INITIAL_NO_AUTH_ACTION_COUNT` requests: the first
    /// three create the IAM user, its policy (every S3 action) and its key; every later request
    /// (the buckets' creation included) must be signed with that key.
    pub fn start_with_iam(
        log_dir: &Path,
        host: std::net::IpAddr,
        buckets: &[&str],
    ) -> anyhow::Result<(Self, IamKey)> {
        let server = Self::spawn(log_dir, host, &[("INITIAL_NO_AUTH_ACTION_COUNT", "3")])?;
        let script = r#"
import sys, boto3
endpoint, buckets = sys.argv[1], sys.argv[2:]
iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                   aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
iam.create_user(UserName="backup")
iam.put_user_policy(UserName="backup", PolicyName="s3",
    PolicyDocument='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}')
key = iam.create_access_key(UserName="backup")["AccessKey"]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
for bucket in buckets:
    s3.create_bucket(Bucket=bucket)
print(key["AccessKeyId"], key["SecretAccessKey"])
"#;
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
        let output = Command::new(python)
            .arg("-c")
            .arg(script)
            .arg(server.direct_endpoint())
            .args(buckets)
            .env("PYTHONPATH", moto_dir()?)
            .output()
            .context("running boto3 to create the store's IAM user")?;
        if !output.status.success() {
            bail!(
                "creating the IAM user of the store failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let mut words = text.split_whitespace();
        let (Some(id), Some(secret)) = (words.next(), words.next()) else {
            bail!("boto3 printed no access key");
        };
        let key = IamKey {
            access_key_id: id.to_string(),
            secret_access_key: secret.to_string(),
        };
        Ok((server, key))
    }

    /// Starts a server on `host` that speaks HTTPS only, with a certificate for `host` signed by
    /// a CA made for it, with `buckets` created; the CA's certificate (PEM), which clients must
    /// be given to trust the server.
    pub fn start_tls(
        log_dir: &Path,
        host: std::net::IpAddr,
        buckets: &[&str],
    ) -> anyhow::Result<(Self, String)> {
        let ca = crate::pg_tls::TestCa::new("test S3 store CA")?;
        let issued = ca.issue(&[&host.to_string()])?;
        let port = crate::free_port();
        let cert_file = log_dir.join(format!("s3-{port}.crt"));
        let key_file = log_dir.join(format!("s3-{port}.key"));
        let ca_file = log_dir.join(format!("s3-{port}-ca.crt"));
        fs::write(&cert_file, &issued.certificate_pem)?;
        fs::write(&key_file, &issued.key_pem)?;
        fs::write(&ca_file, ca.pem())?;
        let mut server = Self::spawn_on_port(
            log_dir,
            host,
            port,
            &[],
            &[
                "-c".as_ref(),
                cert_file.as_os_str(),
                "-k".as_ref(),
                key_file.as_os_str(),
            ],
        )?;
        server.tls = true;
        let script = r#"
import sys, boto3
endpoint, ca, buckets = sys.argv[1], sys.argv[2], sys.argv[3:]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", verify=ca,
                  aws_access_key_id="test", aws_secret_access_key="test")
for bucket in buckets:
    s3.create_bucket(Bucket=bucket)
"#;
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
        let output = Command::new(python)
            .arg("-c")
            .arg(script)
            .arg(server.direct_endpoint())
            .arg(&ca_file)
            .args(buckets)
            .env("PYTHONPATH", moto_dir()?)
            .output()
            .context("running boto3 to create the store's buckets")?;
        if !output.status.success() {
            bail!(
                "creating buckets on the TLS store failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok((server, ca.pem().to_string()))
    }

    fn spawn(log_dir: &Path, host: std::net::IpAddr, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::spawn_on_port(log_dir, host, crate::free_port(), env, &[])
    }

    fn spawn_on_port(
        log_dir: &Path,
        host: std::net::IpAddr,
        port: u16,
        env: &[(&str, &str)],
        extra_args: &[&std::ffi::OsStr],
    ) -> anyhow::Result<Self> {
        let moto = moto_dir()?;
        let log = log_dir.join(format!("moto-{port}.log"));
        let recording = log_dir.join(format!("moto-{port}-requests.jsonl"));
        let log_file = fs::File::create(&log)?;
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
        let mut command = Command::new(python);
        command
            .args(["-m", "moto.server", "-H"])
            .arg(host.to_string())
            .arg("-p")
            .arg(port.to_string())
            .args(extra_args)
            .env("PYTHONPATH", &moto)
            // moto's request recorder, off until [`S3Server::start_recording`].
            .env("MOTO_RECORDER_FILEPATH", &recording)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        die_with_parent(&mut command);
        let child = command.spawn().context("spawning moto's S3 server")?;
        let proxy = TcpProxy::start((host, port).into())?;
        let server = Self {
            host,
            port,
            tls: false,
            proxy,
            process: ChildGuard::new(child, Signal::SIGTERM, Duration::from_secs(5)),
            log,
            recording,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect((host, port)).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "moto's S3 server did not listen on {port}: {}",
                    fs::read_to_string(&server.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(server)
    }

    /// Endpoint URL the clients use (through the proxy): `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.proxy.port())
    }

    /// Endpoint URL of the server itself, on the address it listens on (no proxy: it cannot be
    /// cut): `http://<host>:<port>` (`https` for [`S3Server::start_tls`]).
    pub fn direct_endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.host, self.port)
    }

    /// Creates a bucket (an S3 `PUT /<bucket>`).
    pub fn create_bucket(&self, bucket: &str) -> anyhow::Result<()> {
        let code = self.request("PUT", &format!("/{bucket}"))?;
        if !(200..300).contains(&code) {
            bail!("creating bucket {bucket}: HTTP {code}");
        }
        Ok(())
    }

    /// The text of an object (an S3 `GetObject`; a server without IAM only).
    pub fn get_object(&self, bucket: &str, key: &str) -> anyhow::Result<String> {
        self.get_body(&format!("/{bucket}/{key}"))
    }

    /// Writes an object (an S3 `PutObject`; a server without IAM only).
    pub fn put_object(&self, bucket: &str, key: &str, body: &str) -> anyhow::Result<()> {
        let (code, response) = self.exchange_with_body("PUT", &format!("/{bucket}/{key}"), body)?;
        if !(200..300).contains(&code) {
            bail!("PUT /{bucket}/{key}: HTTP {code}: {response}");
        }
        Ok(())
    }

    /// Keys under `prefix` in `bucket` (an S3 `ListObjectsV2`, first 1000 keys).
    pub fn list_keys(&self, bucket: &str, prefix: &str) -> anyhow::Result<Vec<String>> {
        let body = self.get_body(&format!("/{bucket}?list-type=2&prefix={prefix}"))?;
        Ok(body
            .split("<Key>")
            .skip(1)
            .filter_map(|part| part.split_once("</Key>").map(|(key, _)| key.to_string()))
            .collect())
    }

    /// Bytes stored under `prefix` in `bucket` (an S3 `ListObjectsV2`, first 1000 keys).
    pub fn stored_bytes(&self, bucket: &str, prefix: &str) -> anyhow::Result<u64> {
        let body = self.get_body(&format!("/{bucket}?list-type=2&prefix={prefix}"))?;
        Ok(body
            .split("<Size>")
            .skip(1)
            .filter_map(|part| part.split_once("</Size>")?.0.parse::<u64>().ok())
            .sum())
    }

    /// Makes moto record every request from now on, headers included (its recorder), for
    /// [`Self::recorded_requests`].
    pub fn start_recording(&self) -> anyhow::Result<()> {
        let code = self.request("POST", "/moto-api/recorder/start-recording")?;
        if !(200..300).contains(&code) {
            bail!("starting moto's recorder: HTTP {code}");
        }
        Ok(())
    }

    /// The requests clients made since [`Self::start_recording`], oldest first (this helper's
    /// own, such as [`Self::list_keys`], left out).
    pub fn recorded_requests(&self) -> Vec<RecordedRequest> {
        let text = fs::read_to_string(&self.recording).unwrap_or_default();
        let own_host = format!("{}:{}", self.host, self.port);
        text.lines()
            // A line cut short (the server still writing it) is left out.
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .map(|entry| {
                let header = |name: &str| {
                    entry["headers"]
                        .as_object()
                        .and_then(|headers| {
                            headers
                                .iter()
                                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                        })
                        .and_then(|(_, value)| value.as_str())
                        .unwrap_or_default()
                        .to_string()
                };
                RecordedRequest {
                    method: entry["method"].as_str().unwrap_or_default().to_string(),
                    url: entry["url"].as_str().unwrap_or_default().to_string(),
                    host: header("Host"),
                    authorization: header("Authorization"),
                }
            })
            .filter(|request| request.host != own_host)
            .collect()
    }

    fn request(&self, method: &str, path: &str) -> anyhow::Result<u16> {
        let (code, _) = self.exchange(method, path)?;
        Ok(code)
    }

    fn get_body(&self, path: &str) -> anyhow::Result<String> {
        let (code, body) = self.exchange("GET", path)?;
        if code != 200 {
            bail!("GET {path}: HTTP {code}: {body}");
        }
        Ok(body)
    }

    fn exchange(&self, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
        self.exchange_with_body(method, path, "")
    }

    /// Requests go out signed by nobody: moto without IAM accepts any signature, but treats a
    /// request without one as anonymous, which private objects (barman's) refuse.
    fn exchange_with_body(
        &self,
        method: &str,
        path: &str,
        body: &str,
    ) -> anyhow::Result<(u16, String)> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect((self.host, self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            stream,
            "{method} {path} HTTP/1.0\r\nHost: {}:{}\r\nAuthorization: {ANY_SIGNATURE}\r\nContent-Length: {}\r\n\r\n{body}",
            self.host,
            self.port,
            body.len()
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(crate::http::status_and_body(&response))
    }

    /// Cuts the store off: every connection through [`Self::endpoint`] is closed and new ones
    /// are refused, as with a store that went away (its data stays).
    pub fn cut(&self) {
        self.proxy.cut();
    }

    /// Makes the store slow: every new connection waits `latency` first (zero: fast again).
    pub fn slow_down(&self, latency: Duration) {
        self.proxy.set_latency(latency);
    }

    /// Brings the store back after [`Self::cut`].
    pub fn restore(&self) {
        self.proxy.restore();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.process.stop();
    }
}
