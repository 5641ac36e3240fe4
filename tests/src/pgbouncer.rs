//! A real PgBouncer for tests: Debian's `pgbouncer` package (what the Pooler image ships),
//! installed on first use (or by `cargo xtask setup`) into `<testbed>/pgbouncer-<version>/` with
//! `apt-get download` and `dpkg -x` (no root needed unless the package lists are missing), with
//! the shared library the host may lack (`libc-ares2`) beside it and a launcher that finds it:
//! `bin/pgbouncer`. [`PgBouncer`] runs it on a free loopback port as the unprivileged user
//! (PgBouncer refuses to run as root) and stops it on drop.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::paths;
use crate::process::{ChildGuard, chown_to_unprivileged, unprivileged_command};

/// Upstream PgBouncer version of Debian 12's package.
pub const VERSION: &str = "1.18.0";
/// Debian packages extracted: PgBouncer and the c-ares library it links that a minimal host
/// lacks (its other libraries — libevent, OpenSSL, PAM, systemd — are in every Debian base).
const PACKAGES: &[&str] = &["pgbouncer", "libc-ares2"];

/// Folder of the extracted packages.
pub fn install_dir() -> PathBuf {
    std::env::var_os("PGBOUNCER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| paths::testbed_dir().join(format!("pgbouncer-{VERSION}")))
}

/// The launcher: `bin/pgbouncer` of [`install_dir`].
pub fn binary() -> PathBuf {
    install_dir().join("bin").join("pgbouncer")
}

/// Where [`install_dir`] is mounted in the Pooler image of the node agent's image table. The
/// node agent replaces the *parent* of an image path with a folder of links, so the parent must
/// be a folder of its own: under `/usr/lib` it hid the system's libraries from the pod, and
/// nothing in it could start (`sh: mount: not found`).
pub const IMAGE_DIR: &str = "/opt/pgbouncer/debian";

/// A launcher for the node agent's image (mounted at `/usr/local/bin/pgbouncer`, with
/// [`install_dir`] at [`IMAGE_DIR`]): a bind-mounted file cannot find its folder from `$0`.
/// Written on first use; `None` when PgBouncer is not installed.
pub fn image_launcher() -> anyhow::Result<Option<PathBuf>> {
    let dir = install_dir();
    let Some(library) = find(&dir, "libcares.so.2") else {
        return Ok(None);
    };
    let library_dir = library
        .parent()
        .and_then(|folder| folder.strip_prefix(&dir).ok())
        .context("library inside the install folder")?
        .display()
        .to_string();
    let launcher = dir.join("bin").join("pgbouncer-in-image");
    let script = format!(
        "#!/bin/sh\nLD_LIBRARY_PATH=\"{IMAGE_DIR}/{library_dir}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}\" exec {IMAGE_DIR}/usr/sbin/pgbouncer \"$@\"\n"
    );
    if fs::read_to_string(&launcher).ok().as_deref() != Some(script.as_str()) {
        let staged = launcher.with_extension("new");
        fs::write(&staged, script)?;
        fs::set_permissions(&staged, fs::Permissions::from_mode(0o755))?;
        fs::rename(&staged, &launcher)?;
    }
    Ok(Some(launcher))
}

/// Installs PgBouncer unless it is there; returns the launcher.
pub fn install() -> anyhow::Result<PathBuf> {
    let launcher = binary();
    if launcher.exists() {
        return Ok(launcher);
    }
    let _lock = crate::object_store::lock("pgbouncer")?;
    if launcher.exists() {
        return Ok(launcher);
    }
    let dir = install_dir();
    let parent = dir.parent().context("install dir has a parent")?;
    fs::create_dir_all(parent)?;
    let staging = tempfile::Builder::new()
        .prefix(".pgbouncer-")
        .tempdir_in(parent)?;
    let debs = staging.path().join("debs");
    let root = staging.path().join("root");
    fs::create_dir_all(&debs)?;
    if !apt_download(&debs)? {
        // A fresh machine may have no package lists yet.
        let status = Command::new("apt-get")
            .args(["update", "-qq"])
            .status()
            .context("running apt-get update")?;
        if !status.success() || !apt_download(&debs)? {
            bail!(
                "apt-get download {} failed: PgBouncer comes from Debian's package (run as root once, or apt-get update)",
                PACKAGES.join(" ")
            );
        }
    }
    for deb in fs::read_dir(&debs)? {
        let deb = deb?.path();
        let status = Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(&root)
            .status()
            .context("running dpkg-deb -x")?;
        if !status.success() {
            bail!("dpkg-deb -x {} failed ({status})", deb.display());
        }
    }
    let library = find(&root, "libcares.so.2").context("libc-ares2 has libcares.so.2")?;
    let library_dir = library
        .parent()
        .and_then(|dir| dir.strip_prefix(&root).ok())
        .context("library inside the extracted tree")?
        .to_path_buf();
    fs::create_dir_all(root.join("bin"))?;
    // Relative to the launcher, so that the folder can be copied or mounted elsewhere.
    let script = format!(
        "#!/bin/sh\nhere=$(dirname \"$(readlink -f \"$0\")\")/..\n\
         LD_LIBRARY_PATH=\"$here/{}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}\" exec \"$here/usr/sbin/pgbouncer\" \"$@\"\n",
        library_dir.display()
    );
    let staged_launcher = root.join("bin").join("pgbouncer");
    fs::write(&staged_launcher, script)?;
    fs::set_permissions(&staged_launcher, fs::Permissions::from_mode(0o755))?;
    let output = Command::new(&staged_launcher).arg("--version").output()?;
    let version = String::from_utf8_lossy(&output.stdout);
    if !version.contains(&format!("PgBouncer {VERSION}")) {
        bail!("the downloaded pgbouncer reports {version:?}, expected PgBouncer {VERSION}");
    }
    // Readable by the unprivileged user that runs it.
    make_readable(&root)?;
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::rename(&root, &dir)?;
    Ok(launcher)
}

fn apt_download(into: &Path) -> anyhow::Result<bool> {
    let output = Command::new("apt-get")
        .arg("download")
        .args(PACKAGES)
        .current_dir(into)
        .stdin(Stdio::null())
        .output()
        .context("running apt-get download (Debian's apt is needed for PgBouncer)")?;
    Ok(output.status.success())
}

fn find(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.file_name().is_some_and(|file| file == name) {
            return Some(path);
        }
        if path.is_dir()
            && !path.is_symlink()
            && let Some(found) = find(&path, name)
        {
            return Some(found);
        }
    }
    None
}

fn make_readable(dir: &Path) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        if path.is_symlink() {
            continue;
        }
        let mode = fs::metadata(&path)?.permissions().mode();
        if path.is_dir() {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode | 0o755))?;
            make_readable(&path)?;
        } else {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode | 0o444))?;
        }
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// A PgBouncer process with its own folder (config, auth file, log) on a free loopback port.
pub struct PgBouncer {
    dir: tempfile::TempDir,
    port: u16,
    process: Option<ChildGuard>,
    env: Vec<(String, String)>,
}

impl PgBouncer {
    /// A folder and a port, before anything runs: render the configuration with
    /// [`Self::port`], [`Self::auth_file`] and [`Self::socket_dir`], then [`Self::start`].
    pub fn prepare() -> anyhow::Result<Self> {
        install()?;
        let dir = tempfile::Builder::new().prefix("pgbouncer-").tempdir()?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        fs::create_dir_all(dir.path().join("socket"))?;
        chown_to_unprivileged(dir.path())?;
        Ok(Self {
            dir,
            port: crate::free_port(),
            process: None,
            env: Vec::new(),
        })
    }

    /// Sets an environment variable of the process started next (`HOSTALIASES`, so that c-ares
    /// resolves a Service's short name to the loopback address).
    pub fn env(&mut self, key: &str, value: &str) -> &mut Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Its process id, once started (a benchmark reads its CPU time from /proc).
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ChildGuard::pid)
    }

    /// Port PgBouncer listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The folder of its files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Path of pgbouncer.ini.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("pgbouncer.ini")
    }

    /// Path of the auth file.
    pub fn auth_file(&self) -> PathBuf {
        self.dir.path().join("userlist.txt")
    }

    /// Folder of its Unix socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("socket")
    }

    /// Path of its log (stdout and stderr of the process).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("pgbouncer.log")
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Writes the configuration and the auth file, starts `pgbouncer <config>` and waits until
    /// it accepts connections.
    pub fn start(&mut self, ini: &str, auth_file: &str) -> anyhow::Result<()> {
        let config = self.config_path().display().to_string();
        self.spawn(ini, auth_file, &binary(), &[&config], None)
    }

    /// As [`Self::start`], through a POSIX shell script (the Pooler pod's supervisor) that finds
    /// `pgbouncer` on PATH.
    pub fn start_script(&mut self, ini: &str, auth_file: &str, script: &str) -> anyhow::Result<()> {
        let bin = binary().parent().map(Path::to_path_buf).unwrap_or_default();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
        );
        self.spawn(
            ini,
            auth_file,
            Path::new("/bin/sh"),
            &["-c", script],
            Some(path),
        )
    }

    fn spawn(
        &mut self,
        ini: &str,
        auth_file: &str,
        program: &Path,
        args: &[&str],
        path: Option<String>,
    ) -> anyhow::Result<()> {
        self.write_file(&self.config_path(), ini)?;
        self.write_file(&self.auth_file(), auth_file)?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        chown_to_unprivileged(&self.log_path())?;
        let mut command = unprivileged_command(program)?;
        if let Some(path) = path {
            command.env("PATH", path);
        }
        command.envs(self.env.iter().map(|(key, value)| (key, value)));
        command
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = command
            .spawn()
            .with_context(|| format!("spawning {}", program.display()))?;
        self.process = Some(ChildGuard::new(
            child,
            Signal::SIGINT,
            Duration::from_secs(10),
        ));
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(process) = self.process.as_mut()
                && let Some(status) = process.try_wait()
            {
                bail!("pgbouncer exited ({status}):\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "pgbouncer did not listen on {} in 15 s:\n{}",
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Replaces pgbouncer.ini (as a ConfigMap update does); nothing else.
    pub fn rewrite_config(&self, ini: &str) -> anyhow::Result<()> {
        self.write_file(&self.config_path(), ini)
    }

    /// Sends SIGHUP to the process the fixture started (PgBouncer, or the supervisor script).
    pub fn signal(&self, signal: Signal) {
        if let Some(process) = &self.process {
            let _ = kill(Pid::from_raw(process.pid() as i32), signal);
        }
    }

    /// Stops PgBouncer now, as drop would.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.stop();
        }
    }

    fn write_file(&self, path: &Path, text: &str) -> anyhow::Result<()> {
        // Written beside and renamed, as the kubelet swaps a mounted ConfigMap atomically.
        let staged = path.with_extension("new");
        fs::write(&staged, text)?;
        fs::set_permissions(&staged, fs::Permissions::from_mode(0o644))?;
        chown_to_unprivileged(&staged)?;
        fs::rename(&staged, path)?;
        Ok(())
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.stop();
    }
}
