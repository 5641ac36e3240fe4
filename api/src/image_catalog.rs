//! ImageCatalog (namespaced) and ClusterImageCatalog (cluster-scoped): PostgreSQL major version -> image.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Maps PostgreSQL major versions to container images, in one namespace.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "postgres.keiailab.io",
    version = "v1alpha1",
    kind = "ImageCatalog",
    namespaced,
    shortname = "pgimages",
    category = "postgres",
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ImageCatalogSpec {
    /// One image per major version. Changing an image rolls every cluster that uses it.
    #[schemars(length(min = 1, max = 16), extend("x-kubernetes-validations" = [
        {"rule": "self.all(a, self.exists_one(b, b.major == a.major))", "message": "images must list each major version once"}
    ]))]
    pub images: Vec<CatalogImage>,
}

/// Maps PostgreSQL major versions to container images, for every namespace.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "postgres.keiailab.io",
    version = "v1alpha1",
    kind = "ClusterImageCatalog",
    shortname = "pgclusterimages",
    category = "postgres",
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterImageCatalogSpec {
    /// One image per major version. Changing an image rolls every cluster that uses it.
    #[schemars(length(min = 1, max = 16), extend("x-kubernetes-validations" = [
        {"rule": "self.all(a, self.exists_one(b, b.major == a.major))", "message": "images must list each major version once"}
    ]))]
    pub images: Vec<CatalogImage>,
}

/// One catalog entry.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CatalogImage {
    /// PostgreSQL major version, 18 or newer.
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self >= 18", "message": "PostgreSQL major versions below 18 are not supported: catalog entries must be 18 or newer"}
    ]))]
    pub major: i32,
    /// Container image, preferably pinned by digest.
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
}

/// Finds the image for `major` in a catalog's entries.
pub fn image_for_major(images: &[CatalogImage], major: i32) -> Option<&str> {
    images
        .iter()
        .find(|entry| entry.major == major)
        .map(|entry| entry.image.as_str())
}
