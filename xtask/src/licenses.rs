//! The license policy: every dependency that ships or builds our binaries must be available under a
//! permissive license. Copyleft (GPL, LGPL, AGPL) and weak copyleft (MPL, EPL, CDDL) are refused, as
//! is a package without an SPDX `license` field.
//!
//! Allowed: MIT, Apache-2.0 (also WITH LLVM-exception), BSD-2-Clause, BSD-3-Clause, 0BSD, ISC,
//! PostgreSQL, Unicode-3.0, Unicode-DFS-2016, Zlib, CC0-1.0, and CDLA-Permissive-2.0 (a permissive
//! data license: `webpki-root-certs` ships Mozilla's CA list under it). An `OR` expression passes
//! when one branch passes (we pick the permissive one); an `AND` expression needs every part.
//! MIT-0 (MIT without the attribution clause) is allowed too.
//!
//! MPL-2.0 is weak copyleft (file-level) and is refused like the rest, without exceptions.

use std::path::Path;

use anyhow::bail;

use crate::sbom::{self, Edges};

/// SPDX license ids we accept.
pub const ALLOWED: &[&str] = &[
    "MIT",
    "Apache-2.0",
    "BSD-2-Clause",
    "BSD-3-Clause",
    "0BSD",
    "ISC",
    "PostgreSQL",
    "Unicode-3.0",
    "Unicode-DFS-2016",
    "Zlib",
    "CC0-1.0",
    "CDLA-Permissive-2.0",
    "MIT-0",
];

/// SPDX exceptions we accept after `WITH`.
pub const ALLOWED_EXCEPTIONS: &[&str] = &["LLVM-exception"];

/// Whether an SPDX expression satisfies the policy (`Err` explains a malformed expression).
pub fn allowed(expression: &str) -> Result<bool, String> {
    let parsed = spdx::Expression::parse_mode(expression, spdx::ParseMode::LAX)
        .map_err(|e| format!("not an SPDX expression: {e}"))?;
    Ok(parsed.evaluate(|requirement| {
        let license = match &requirement.license {
            spdx::LicenseItem::Spdx { id, .. } => ALLOWED.contains(&id.name),
            spdx::LicenseItem::Other(_) => false,
        };
        let addition = match &requirement.addition {
            None => true,
            Some(spdx::AdditionItem::Spdx(exception)) => {
                ALLOWED_EXCEPTIONS.contains(&exception.name)
            }
            Some(spdx::AdditionItem::Other(_)) => false,
        };
        license && addition
    }))
}

/// Checks every normal and build dependency of the workspace at `manifest_path`; returns how many
/// packages passed, or fails naming each offending package and its license.
pub fn check(manifest_path: &Path) -> anyhow::Result<usize> {
    let metadata = sbom::metadata(manifest_path)?;
    let roots = metadata.workspace_members.clone();
    let included = sbom::reachable(&metadata, &roots, Edges::Build);
    let mut problems = Vec::new();
    for package in metadata
        .packages
        .iter()
        .filter(|p| included.contains(&p.id))
    {
        let verdict = match sbom::license_expression(package) {
            None => Err("no SPDX `license` field".to_string()),
            Some(expression) => match allowed(&expression) {
                Ok(true) => Ok(()),
                Ok(false) => Err(format!(
                    "`{expression}` is not a permissive license we allow"
                )),
                Err(error) => Err(format!("`{expression}`: {error}")),
            },
        };
        if let Err(reason) = verdict {
            problems.push(format!("{} {}: {reason}", package.name, package.version));
        }
    }
    if !problems.is_empty() {
        bail!(
            "license check failed: {} package(s) are copyleft or unlicensed (allowed: {}):\n{}",
            problems.len(),
            ALLOWED.join(", "),
            problems.join("\n")
        );
    }
    Ok(included.len())
}

#[cfg(test)]
mod tests {
    use super::allowed;

    #[test]
    fn permissive_licenses_pass_and_copyleft_fails() {
        for ok in [
            "MIT",
            "MIT OR Apache-2.0",
            "MIT/Apache-2.0",
            "Apache-2.0 WITH LLVM-exception OR Apache-2.0 OR MIT",
            "(MIT OR Apache-2.0) AND Unicode-3.0",
            "MIT OR Apache-2.0 OR LGPL-2.1-or-later",
            "PostgreSQL",
        ] {
            assert_eq!(allowed(ok), Ok(true), "{ok}");
        }
        for bad in [
            "GPL-3.0-only",
            "MIT AND GPL-2.0-or-later",
            "LGPL-2.1-or-later",
            "MPL-2.0",
            "AGPL-3.0-only",
        ] {
            assert_eq!(allowed(bad), Ok(false), "{bad}");
        }
    }
}
