//! The one table from a container image to local files: an "image" here is a set of host paths
//! bind-mounted at the paths the image would have them, over the host's root, plus its default
//! entrypoint.

use std::path::PathBuf;

/// What a container of an image sees.
#[derive(Debug, Clone, Default)]
pub struct LocalImage {
    /// (host path, path inside the container) bind mounts.
    pub files: Vec<(PathBuf, String)>,
    /// The image's ENTRYPOINT when the container gives no command.
    pub entrypoint: Vec<String>,
}

/// Maps image references (without tag or digest) to local files.
#[derive(Debug, Clone, Default)]
pub struct ImageTable {
    images: Vec<(String, LocalImage)>,
}

impl ImageTable {
    /// The table of the project's images from a workspace build in `binaries` (target/debug) and
    /// PostgreSQL 18 from `pg_install` (the folder with bin/, lib/, share/).
    ///
    /// Files under /tmp are copied out first (see [`crate::outside_tmp`]): pods mount their own
    /// /tmp, which would hide them.
    pub fn project(
        binaries: &std::path::Path,
        pg_install: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let binary = |name: &str| -> anyhow::Result<(PathBuf, String)> {
            Ok((
                crate::outside_tmp(&binaries.join(name))?,
                format!("/usr/local/bin/{name}"),
            ))
        };
        let postgres = (
            // The whole pip install: the binaries' libraries live beside `pginstall`.
            crate::outside_tmp_with(
                pg_install,
                pg_install.ancestors().nth(2).unwrap_or(pg_install),
            )?,
            "/usr/lib/postgresql/18".to_string(),
        );
        let mut table = Self::default();
        table.add(
            "postgres-operator",
            LocalImage {
                files: vec![binary("postgres-operator")?],
                entrypoint: vec!["/usr/local/bin/postgres-operator".to_string()],
            },
        );
        table.add(
            "pg-instance",
            LocalImage {
                files: vec![binary("pg-instance")?, postgres.clone()],
                entrypoint: vec!["/usr/local/bin/pg-instance".to_string()],
            },
        );
        table.add(
            "postgres",
            LocalImage {
                files: vec![postgres],
                entrypoint: Vec::new(),
            },
        );
        // The Pooler image (Debian's PgBouncer, run by the pod's `sh` supervisor), when the test
        // bed has it (`cargo xtask setup`).
        if let Some(launcher) = testbed::pgbouncer::image_launcher()? {
            table.add(
                "pgbouncer",
                LocalImage {
                    files: vec![
                        (
                            crate::outside_tmp(&testbed::pgbouncer::install_dir())?,
                            testbed::pgbouncer::IMAGE_DIR.to_string(),
                        ),
                        (
                            crate::outside_tmp(&launcher)?,
                            "/usr/local/bin/pgbouncer".to_string(),
                        ),
                    ],
                    entrypoint: vec!["/usr/local/bin/pgbouncer".to_string()],
                },
            );
        }
        table.add(
            "pg-router",
            LocalImage {
                files: vec![binary("pg-router")?],
                entrypoint: vec!["/usr/local/bin/pg-router".to_string()],
            },
        );
        Ok(table)
    }

    /// barman-cloud, the backup engine, in the `pg-instance` image: one launcher per
    /// `barman-cloud-*` command (and `barman-cloud-python`) at `/usr/local/bin` (where `pg-instance --barman-bin` looks by
    /// default), running barman from the install at `barman_root` (with `lib/`, as
    /// `testbed::object_store` installs it). The launchers are written anew, outside /tmp, since
    /// those of the install name its folder, which a pod's own /tmp may hide.
    pub fn add_barman_cloud(&mut self, barman_root: &std::path::Path) -> anyhow::Result<()> {
        let lib = crate::outside_tmp(&barman_root.join("lib"))?;
        let launchers = crate::work_dir()?
            .join(format!("images-{}", std::process::id()))
            .join("barman-cloud-bin");
        std::fs::create_dir_all(&launchers)?;
        let mut files = Vec::new();
        for (command, script) in testbed::object_store::launchers(&lib) {
            let path = launchers.join(&command);
            std::fs::write(&path, script)?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
            files.push((path, format!("/usr/local/bin/{command}")));
        }
        let image = self
            .images
            .iter_mut()
            .find(|(known, _)| known == "pg-instance")
            .map(|(_, image)| image)
            .ok_or_else(|| anyhow::anyhow!("the image table has no pg-instance image"))?;
        image.files.extend(files);
        Ok(())
    }

    /// Adds (or replaces) an image: `name` matches the last path segment of the repository.
    pub fn add(&mut self, name: &str, image: LocalImage) {
        self.images.retain(|(known, _)| known != name);
        self.images.push((name.to_string(), image));
    }

    /// The local image for `reference` (`registry/path/name:tag@digest`).
    pub fn resolve(&self, reference: &str) -> Option<&LocalImage> {
        let without_digest = reference.split('@').next().unwrap_or(reference);
        let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
        let name = last.split(':').next().unwrap_or(last);
        self.images
            .iter()
            .find(|(known, _)| known == name)
            .map(|(_, image)| image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_by_last_segment_without_tag_or_digest() {
        let table =
            ImageTable::project(std::path::Path::new("/b"), std::path::Path::new("/pg")).unwrap();
        assert!(
            table
                .resolve("ghcr.io/keiailab/pg-instance:0.1.0")
                .is_some()
        );
        assert!(table.resolve("pg-router@sha256:abc").is_some());
        assert!(table.resolve("docker.io/library/busybox:1").is_none());
    }
}
