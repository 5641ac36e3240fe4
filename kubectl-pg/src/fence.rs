//! The cluster's fence annotation (`postgres.keiailab.io/fenced`: `"*"` or comma-separated pod
//! names), which the operator copies onto the pods and the instance managers obey. Pure.

/// The instances a cluster's fence annotation names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FenceList {
    /// `"*"`: every instance.
    All,
    /// These pods (sorted, no duplicates); empty means no annotation.
    Pods(Vec<String>),
}

impl FenceList {
    /// Reads the annotation's value.
    pub fn parse(value: &str) -> Self {
        let mut names: Vec<String> = value
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(str::to_string)
            .collect();
        if names.iter().any(|name| name == "*") {
            return FenceList::All;
        }
        names.sort();
        names.dedup();
        FenceList::Pods(names)
    }

    /// Reads the annotation, absent meaning nothing is fenced.
    pub fn from_annotation(value: Option<&str>) -> Self {
        value
            .map(Self::parse)
            .unwrap_or(FenceList::Pods(Vec::new()))
    }

    /// The names as `status` lists them (`*` for all).
    pub fn names(&self) -> Vec<String> {
        match self {
            FenceList::All => vec!["*".to_string()],
            FenceList::Pods(pods) => pods.clone(),
        }
    }

    /// The annotation value to write; `None` removes the annotation.
    pub fn to_annotation(&self) -> Option<String> {
        match self {
            FenceList::All => Some("*".to_string()),
            FenceList::Pods(pods) if pods.is_empty() => None,
            FenceList::Pods(pods) => Some(pods.join(",")),
        }
    }

    /// Whether `pod` is fenced by this list.
    pub fn contains(&self, pod: &str) -> bool {
        match self {
            FenceList::All => true,
            FenceList::Pods(pods) => pods.iter().any(|p| p == pod),
        }
    }

    /// The list with `target` (a pod or `*`) fenced.
    pub fn fence(&self, target: &str) -> Self {
        match (self, target) {
            (FenceList::All, _) | (_, "*") => FenceList::All,
            (FenceList::Pods(pods), pod) => {
                let mut pods = pods.clone();
                pods.push(pod.to_string());
                FenceList::parse(&pods.join(","))
            }
        }
    }

    /// The list with `target` (a pod or `*`) unfenced. Unfencing one pod of `"*"` fences the
    /// other current instances by name (`instances`).
    pub fn unfence(&self, target: &str, instances: &[String]) -> Self {
        match (self, target) {
            (_, "*") => FenceList::Pods(Vec::new()),
            (FenceList::All, pod) => FenceList::parse(
                &instances
                    .iter()
                    .filter(|name| *name != pod)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            (FenceList::Pods(pods), pod) => {
                FenceList::Pods(pods.iter().filter(|p| *p != pod).cloned().collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn fencing_adds_names_once_and_star_wins() {
        let none = FenceList::from_annotation(None);
        let one = none.fence("db-1");
        assert_eq!(one.to_annotation().as_deref(), Some("db-1"));
        let two = one.fence("db-0").fence("db-1");
        assert_eq!(two.to_annotation().as_deref(), Some("db-0,db-1"));
        assert_eq!(two.fence("*"), FenceList::All);
        assert_eq!(FenceList::parse("db-1, *"), FenceList::All);
    }

    #[test]
    fn unfencing_removes_a_name_or_everything() {
        let list = FenceList::parse("db-0,db-1");
        assert_eq!(
            list.unfence("db-0", &[]).to_annotation().as_deref(),
            Some("db-1")
        );
        assert_eq!(list.unfence("*", &[]).to_annotation(), None);
        assert_eq!(
            list.unfence("db-0", &[])
                .unfence("db-1", &[])
                .to_annotation(),
            None
        );
    }

    #[test]
    fn unfencing_one_pod_of_star_names_the_others() {
        let instances = names(&["db-0", "db-1", "db-2"]);
        let list = FenceList::All.unfence("db-1", &instances);
        assert_eq!(list.to_annotation().as_deref(), Some("db-0,db-2"));
        assert!(!list.contains("db-1"));
        assert!(list.contains("db-2"));
    }
}
