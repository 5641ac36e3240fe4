//! Unit tests of the builders: each object as built from a PostgresCluster.

use super::*;
use api::postgres_cluster::{
    PostgresClusterSpec, ReplicationSpec, SynchronousMethod, SynchronousReplication,
};

fn cluster(instances: i32) -> PostgresCluster {
    let mut cluster =
        PostgresCluster::new("db", PostgresClusterSpec::with_image(instances, "pg:18.1"));
    cluster.metadata.namespace = Some("team".to_string());
    cluster.metadata.uid = Some("uid-1".to_string());
    cluster
}

fn resolved() -> Resolved {
    Resolved {
        image: "pg:18.1".to_string(),
        instance_manager_image: "manager:1".to_string(),
        app_secret: "db-app".to_string(),
    }
}

#[test]
fn every_owned_object_carries_the_labels_and_a_controller_owner_reference() {
    let cluster = cluster(3);
    let metas = [
        service_account(&cluster).metadata,
        role(&cluster, "db-app").metadata,
        role_binding(&cluster).metadata,
        config_map(&cluster).metadata,
        service(&cluster, ServiceKind::ReadWrite).metadata,
        stateful_set(&cluster, &resolved()).metadata,
        pod_disruption_budget(&cluster).metadata,
        network_policy(&cluster).metadata,
        credentials_secret(&cluster, "db-superuser".into(), "postgres", "x".into()).metadata,
    ];
    for meta in metas {
        assert_eq!(meta.namespace.as_deref(), Some("team"));
        assert_eq!(meta.labels.as_ref().unwrap()[contract::LABEL_CLUSTER], "db");
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.kind, "PostgresCluster");
        assert_eq!(owner.uid, "uid-1");
        assert_eq!(owner.controller, Some(true));
    }
}

#[test]
fn inherited_metadata_reaches_every_object_pods_and_claims_without_changing_the_spec_hash() {
    let plain = cluster(3);
    let mut cluster = cluster(3);
    cluster.spec.inherited_metadata = Some(api::postgres_cluster::InheritedMetadata {
        labels: BTreeMap::from([("team".to_string(), "payments".to_string())]),
        annotations: BTreeMap::from([("cost-center".to_string(), "42".to_string())]),
    });
    let sts = stateful_set(&cluster, &resolved());
    let spec = sts.spec.clone().unwrap();
    let mut metas = vec![
        service_account(&cluster).metadata,
        role(&cluster, "db-app").metadata,
        role_binding(&cluster).metadata,
        config_map(&cluster).metadata,
        service(&cluster, ServiceKind::ReadWrite).metadata,
        service(&cluster, ServiceKind::ReadOnly).metadata,
        sts.metadata.clone(),
        pod_disruption_budget(&cluster).metadata,
        network_policy(&cluster).metadata,
        credentials_secret(&cluster, "db-superuser".into(), "postgres", "x".into()).metadata,
        spec.template.metadata.clone().unwrap(),
    ];
    metas.extend(
        spec.volume_claim_templates
            .unwrap()
            .into_iter()
            .map(|claim| claim.metadata),
    );
    for meta in &metas {
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(labels["team"], "payments", "{:?}", meta.name);
        assert_eq!(labels[contract::LABEL_CLUSTER], "db", "{:?}", meta.name);
        assert_eq!(
            meta.annotations.as_ref().unwrap()["cost-center"],
            "42",
            "{:?}",
            meta.name
        );
    }
    // Pods and claims created from the templates record what they inherited.
    let template = spec.template.metadata.unwrap();
    assert!(template.annotations.unwrap()[crate::inherited::ANNOTATION_KEYS].contains("team"));
    // The metadata does not roll the pods: running ones are updated in place.
    assert_eq!(
        spec_hash(&cluster, &resolved()),
        spec_hash(&plain, &resolved())
    );
    let plain_template = stateful_set(&plain, &resolved()).spec.unwrap().template;
    assert!(
        !plain_template
            .metadata
            .unwrap()
            .annotations
            .unwrap_or_default()
            .contains_key(crate::inherited::ANNOTATION_KEYS)
    );
}

#[test]
fn services_are_exposed_as_the_spec_says_and_the_any_service_stays_internal() {
    let mut cluster = cluster(2);
    assert_eq!(
        service(&cluster, ServiceKind::ReadWrite)
            .spec
            .unwrap()
            .type_
            .as_deref(),
        Some("ClusterIP")
    );
    cluster.spec.inherited_metadata = Some(api::postgres_cluster::InheritedMetadata {
        labels: BTreeMap::new(),
        annotations: BTreeMap::from([("team".to_string(), "payments".to_string())]),
    });
    cluster.spec.services = Some(api::postgres_cluster::ServicesSpec {
        read_write: Some(api::postgres_cluster::ServiceExposure {
            type_: api::postgres_cluster::ServiceType::LoadBalancer,
            annotations: BTreeMap::from([(
                "service.beta.kubernetes.io/aws-load-balancer-internal".to_string(),
                "true".to_string(),
            )]),
            load_balancer_source_ranges: vec!["10.0.0.0/8".to_string()],
        }),
        read_only: Some(api::postgres_cluster::ServiceExposure {
            type_: api::postgres_cluster::ServiceType::NodePort,
            ..Default::default()
        }),
    });
    let rw = service(&cluster, ServiceKind::ReadWrite);
    let annotations = rw.metadata.annotations.unwrap();
    assert_eq!(
        annotations["service.beta.kubernetes.io/aws-load-balancer-internal"],
        "true"
    );
    assert_eq!(annotations["team"], "payments", "inherited ones too");
    let spec = rw.spec.unwrap();
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(
        spec.load_balancer_source_ranges,
        Some(vec!["10.0.0.0/8".to_string()])
    );
    let ro = service(&cluster, ServiceKind::ReadOnly).spec.unwrap();
    assert_eq!(ro.type_.as_deref(), Some("NodePort"));
    assert_eq!(ro.load_balancer_source_ranges, None);
    let any = service(&cluster, ServiceKind::Any);
    assert_eq!(any.spec.unwrap().type_.as_deref(), Some("ClusterIP"));
    assert!(
        !any.metadata
            .annotations
            .unwrap_or_default()
            .contains_key("service.beta.kubernetes.io/aws-load-balancer-internal")
    );
}

#[test]
fn the_users_env_reaches_the_container_and_the_operators_names_are_all_reserved() {
    let mut cluster = cluster(1);
    // Everything the operator may set: WAL volume, backups with a CA, TLS, metrics.
    cluster.spec.wal_storage = Some(api::common::StorageSpec {
        size: "1Gi".into(),
        storage_class: None,
    });
    cluster.spec.backup = Some(
        serde_json::from_value(serde_json::json!({"s3": {
            "endpoint": "https://s3.example.com", "bucket": "b", "region": "r",
            "credentialsSecret": {"name": "s3"}, "caSecret": {"name": "ca", "key": "ca.crt"}
        }}))
        .unwrap(),
    );
    cluster.spec.monitoring.custom_queries = Some(
        serde_json::from_value(serde_json::json!({"name": "q", "key": "queries.yaml"})).unwrap(),
    );
    let before = spec_hash(&cluster, &resolved());
    let env_of = |cluster: &PostgresCluster| {
        pod_template(cluster, &resolved()).spec.unwrap().containers[0]
            .env
            .clone()
            .unwrap()
    };
    for var in env_of(&cluster) {
        assert!(
            api::postgres_cluster::RESERVED_ENV.contains(&var.name.as_str()),
            "{} is set by the operator but spec.env may set it too",
            var.name
        );
    }
    cluster.spec.env = vec![EnvVar {
        name: "HTTPS_PROXY".into(),
        value: Some("http://proxy:3128".into()),
        ..EnvVar::default()
    }];
    let env = env_of(&cluster);
    assert!(
        env.iter()
            .any(|var| var.name == "HTTPS_PROXY"
                && var.value.as_deref() == Some("http://proxy:3128"))
    );
    assert_ne!(
        spec_hash(&cluster, &resolved()),
        before,
        "a change rolls the pods"
    );
}

#[test]
fn stateful_set_rolls_on_delete_and_keeps_volumes_by_default() {
    let mut cluster = cluster(3);
    cluster.spec.wal_storage = Some(api::common::StorageSpec {
        size: "2Gi".into(),
        storage_class: Some("fast".into()),
    });
    let sts = stateful_set(&cluster, &resolved());
    let spec = sts.spec.unwrap();
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(
        spec.update_strategy.unwrap().type_.as_deref(),
        Some("OnDelete")
    );
    let retention = spec.persistent_volume_claim_retention_policy.unwrap();
    assert_eq!(retention.when_deleted.as_deref(), Some("Retain"));
    let claims = spec.volume_claim_templates.unwrap();
    let names: Vec<_> = claims
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, [DATA_VOLUME, WAL_VOLUME]);
    let wal = claims[1].spec.as_ref().unwrap();
    assert_eq!(wal.storage_class_name.as_deref(), Some("fast"));
    assert_eq!(
        wal.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"],
        Quantity("2Gi".into())
    );
    let pod = spec.template.spec.unwrap();
    let env = pod.containers[0].env.clone().unwrap();
    assert!(env.iter().any(|e| e.name == contract::env::PGWAL));
    let value = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(value("LEASE_DURATION_SECONDS").as_deref(), Some("4"));
    assert_eq!(value("SYNCHRONOUS_STANDBYS").as_deref(), Some("0"));
    let ports: Vec<_> = pod.containers[0]
        .ports
        .clone()
        .unwrap()
        .into_iter()
        .map(|p| (p.name.unwrap(), p.container_port))
        .collect();
    assert_eq!(
        ports,
        [
            (contract::PORT_NAME_POSTGRES.to_string(), 5432),
            (contract::PORT_NAME_STATUS.to_string(), 8000)
        ]
    );
    assert!(
        env.iter()
            .any(|e| e.name == contract::env::CLUSTER_NAME && e.value.as_deref() == Some("db"))
    );
    // The manager logs JSON, as PostgreSQL's jsonlog beside it.
    assert!(
        env.iter()
            .any(|e| e.name == contract::env::LOG_JSON && e.value.as_deref() == Some("true"))
    );
}

#[test]
fn pods_meet_the_restricted_pod_security_standard() {
    let sts = stateful_set(&cluster(1), &resolved());
    let pod = sts.spec.unwrap().template.spec.unwrap();
    let pod_security = pod.security_context.unwrap();
    assert_eq!(pod_security.run_as_non_root, Some(true));
    assert_ne!(pod_security.run_as_user, Some(0));
    assert_eq!(
        pod_security.seccomp_profile.unwrap().type_,
        "RuntimeDefault"
    );
    for container in pod
        .containers
        .iter()
        .chain(pod.init_containers.unwrap().iter())
    {
        let security = container.security_context.clone().unwrap();
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(security.capabilities.unwrap().drop.unwrap(), ["ALL"]);
        assert_eq!(security.run_as_non_root, Some(true));
    }
    for volume in pod.volumes.unwrap() {
        assert!(
            volume.host_path.is_none(),
            "restricted pods take no hostPath"
        );
    }
    let postgres = &pod.containers[0];
    let readiness = postgres.readiness_probe.clone().unwrap().http_get.unwrap();
    assert_eq!(readiness.path.as_deref(), Some("/readyz"));
    assert_eq!(readiness.port, IntOrString::Int(8000));
    assert!(postgres.liveness_probe.is_some() && postgres.startup_probe.is_some());
}

#[test]
fn services_select_by_the_role_the_instance_manager_sets() {
    let cluster = cluster(3);
    let selector = |kind| service(&cluster, kind).spec.unwrap().selector.unwrap();
    let rw = selector(ServiceKind::ReadWrite);
    assert_eq!(rw[contract::LABEL_ROLE], "primary");
    assert_eq!(rw[contract::LABEL_CLUSTER], "db");
    assert_eq!(
        selector(ServiceKind::ReadOnly)[contract::LABEL_ROLE],
        "replica"
    );
    assert!(!selector(ServiceKind::Any).contains_key(contract::LABEL_ROLE));
    assert_eq!(
        service(&cluster, ServiceKind::ReadWrite)
            .metadata
            .name
            .unwrap(),
        "db-rw"
    );
    assert_eq!(
        service(&cluster, ServiceKind::ReadOnly)
            .metadata
            .name
            .unwrap(),
        "db-ro"
    );
    assert_eq!(
        service(&cluster, ServiceKind::Any).metadata.name.unwrap(),
        "db-r"
    );
}

#[test]
fn instance_manager_role_is_limited_to_the_clusters_own_objects() {
    let role = role(&cluster(2), "db-app");
    let rules = role.rules.unwrap();
    let pod_patch = rules
        .iter()
        .find(|r| {
            r.resources.as_ref().unwrap()[0] == "pods" && r.verbs.contains(&"patch".to_string())
        })
        .unwrap();
    assert_eq!(pod_patch.resource_names.clone().unwrap(), ["db-0", "db-1"]);
    let secrets = rules
        .iter()
        .find(|r| r.resources.as_ref().unwrap()[0] == "secrets")
        .unwrap();
    assert_eq!(secrets.verbs, ["get"]);
    assert_eq!(
        secrets.resource_names.clone().unwrap(),
        ["db-superuser", "db-replication", "db-app", "db-pooler-auth"]
    );
    assert!(rules.iter().any(|r| {
        r.resources.as_ref().unwrap()[0] == "events" && r.verbs.contains(&"create".to_string())
    }));
    for rule in &rules {
        assert!(!rule.verbs.contains(&"delete".to_string()));
        assert!(!rule.verbs.contains(&"*".to_string()));
    }
}

#[test]
fn instance_manager_role_covers_declarative_users_and_databases() {
    let rules = role(&cluster(2), "db-app").rules.unwrap();
    let verbs_on = |resource: &str| -> Vec<String> {
        rules
            .iter()
            .filter(|r| r.resources.as_ref().unwrap().iter().any(|x| x == resource))
            .flat_map(|r| r.verbs.clone())
            .collect()
    };
    for resource in ["postgresusers", "postgresdatabases"] {
        assert_eq!(verbs_on(resource), ["get", "list", "watch", "patch"]);
        assert_eq!(verbs_on(&format!("{resource}/status")), ["patch"]);
    }
    assert!(verbs_on("secrets").contains(&"create".to_string()));
    assert_eq!(verbs_on("events"), ["create", "patch"]);
}

#[test]
fn failover_timings_reach_the_instance_manager() {
    let mut cluster = cluster(3);
    cluster.spec.failover.failover_delay_seconds = 7;
    cluster.spec.failover.lease_duration_seconds = 9;
    let set = stateful_set(&cluster, &resolved());
    let pod = set.spec.unwrap().template.spec.unwrap();
    let env = pod
        .containers
        .iter()
        .find(|container| container.name == "postgres")
        .and_then(|container| container.env.clone())
        .unwrap();
    let value = |name: &str| {
        env.iter()
            .find(|var| var.name == name)
            .and_then(|var| var.value.clone())
    };
    assert_eq!(value("FAILOVER_DELAY_SECONDS").as_deref(), Some("7"));
    assert_eq!(value("LEASE_DURATION_SECONDS").as_deref(), Some("9"));
}

#[test]
fn scheduling_and_resources_reach_the_pods() {
    use k8s_openapi::api::core::v1::{
        Affinity, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
        ResourceRequirements, Toleration, TopologySpreadConstraint,
    };
    let mut cluster = cluster(3);
    let affinity = Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(vec![NodeSelectorRequirement {
                        key: "disk".into(),
                        operator: "In".into(),
                        values: Some(vec!["ssd".into()]),
                    }]),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let toleration = Toleration {
        key: Some("dedicated".into()),
        operator: Some("Equal".into()),
        value: Some("postgres".into()),
        effect: Some("NoSchedule".into()),
        ..Default::default()
    };
    let spread = TopologySpreadConstraint {
        max_skew: 1,
        topology_key: "topology.kubernetes.io/zone".into(),
        when_unsatisfiable: "DoNotSchedule".into(),
        ..Default::default()
    };
    cluster.spec.scheduling = Some(api::postgres_cluster::SchedulingSpec {
        node_selector: BTreeMap::from([("pool".to_string(), "db".to_string())]),
        affinity: Some(affinity.clone()),
        tolerations: vec![toleration.clone()],
        topology_spread_constraints: vec![spread.clone()],
        priority_class_name: Some("database-critical".into()),
    });
    let resources = ResourceRequirements {
        requests: Some(BTreeMap::from([(
            "cpu".to_string(),
            Quantity("500m".into()),
        )])),
        limits: Some(BTreeMap::from([(
            "memory".to_string(),
            Quantity("1Gi".into()),
        )])),
        ..Default::default()
    };
    cluster.spec.resources = Some(resources.clone());
    let pod = stateful_set(&cluster, &resolved())
        .spec
        .unwrap()
        .template
        .spec
        .unwrap();
    assert_eq!(pod.affinity, Some(affinity));
    assert_eq!(pod.tolerations, Some(vec![toleration]));
    assert_eq!(pod.topology_spread_constraints, Some(vec![spread]));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("database-critical")
    );
    assert_eq!(pod.node_selector.unwrap()["pool"], "db");
    assert_eq!(pod.containers[0].resources, Some(resources));

    // Without an affinity of their own, instances prefer distinct nodes.
    let pod = stateful_set(&self::cluster(3), &resolved())
        .spec
        .unwrap()
        .template
        .spec
        .unwrap();
    assert!(pod.affinity.unwrap().pod_anti_affinity.is_some());
}

#[test]
fn initdb_options_reach_the_instance_manager() {
    let mut cluster = cluster(1);
    let env_of = |cluster: &PostgresCluster| {
        let set = stateful_set(cluster, &resolved());
        let pod = set.spec.unwrap().template.spec.unwrap();
        pod.containers
            .iter()
            .find(|container| container.name == "postgres")
            .and_then(|container| container.env.clone())
            .unwrap()
            .into_iter()
            .filter(|var| var.name.starts_with("INITDB_"))
            .map(|var| (var.name, var.value.unwrap_or_default()))
            .collect::<BTreeMap<_, _>>()
    };
    let defaults = env_of(&cluster);
    assert_eq!(defaults["INITDB_ENCODING"], "UTF8");
    assert_eq!(defaults["INITDB_LOCALE"], "C");
    assert_eq!(defaults["INITDB_DATA_CHECKSUMS"], "true");
    let database = |cluster: &PostgresCluster| {
        let set = stateful_set(cluster, &resolved());
        let pod = set.spec.unwrap().template.spec.unwrap();
        pod.containers[0]
            .env
            .clone()
            .unwrap()
            .into_iter()
            .find(|var| var.name == "APP_DATABASE")
            .and_then(|var| var.value)
    };
    assert_eq!(database(&cluster).as_deref(), Some("app"));
    cluster.spec.bootstrap = Some(api::postgres_cluster::BootstrapSpec {
        initdb: Some(api::postgres_cluster::InitdbBootstrap {
            encoding: "LATIN1".into(),
            locale: "en_US".into(),
            data_checksums: false,
            database: "shop".into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    assert_eq!(database(&cluster).as_deref(), Some("shop"));
    let chosen = env_of(&cluster);
    assert_eq!(chosen["INITDB_ENCODING"], "LATIN1");
    assert_eq!(chosen["INITDB_LOCALE"], "en_US");
    assert_eq!(chosen["INITDB_DATA_CHECKSUMS"], "false");
}

#[test]
fn hibernation_scales_to_zero_by_field_or_annotation() {
    let mut cluster = cluster(3);
    assert_eq!(desired_replicas(&cluster), 3);
    cluster.spec.hibernation = true;
    assert_eq!(desired_replicas(&cluster), 0);
    cluster.spec.hibernation = false;
    cluster.metadata.annotations = Some(BTreeMap::from([(
        api::postgres_cluster::HIBERNATION_ANNOTATION.to_string(),
        "on".to_string(),
    )]));
    assert_eq!(desired_replicas(&cluster), 0);
}

#[test]
fn spec_hash_changes_with_the_image_restart_parameters_and_pod_spec_only() {
    let mut cluster = cluster(3);
    let base = spec_hash(&cluster, &resolved());
    cluster
        .spec
        .postgresql
        .parameters
        .insert("work_mem".into(), "64MB".into());
    assert_eq!(
        spec_hash(&cluster, &resolved()),
        base,
        "work_mem only needs a reload"
    );
    cluster
        .spec
        .postgresql
        .parameters
        .insert("shared_buffers".into(), "1GB".into());
    assert_ne!(
        spec_hash(&cluster, &resolved()),
        base,
        "shared_buffers needs a restart"
    );
    let mut other = resolved();
    other.image = "pg:18.2".into();
    assert_ne!(
        spec_hash(&cluster, &other),
        spec_hash(&cluster, &resolved())
    );
    // Resources and scheduling are in the pod spec: with OnDelete, only a roll brings them to
    // the pods. The template carries the same hash the rolling plan compares with.
    let before = spec_hash(&cluster, &resolved());
    cluster.spec.resources =
        Some(serde_json::from_value(serde_json::json!({"requests": {"cpu": "2"}})).unwrap());
    let after = spec_hash(&cluster, &resolved());
    assert_ne!(after, before, "resources roll the pods");
    cluster.spec.scheduling =
        Some(serde_json::from_value(serde_json::json!({"nodeSelector": {"disk": "ssd"}})).unwrap());
    assert_ne!(
        spec_hash(&cluster, &resolved()),
        after,
        "scheduling rolls the pods"
    );
    let template = pod_template(&cluster, &resolved());
    assert_eq!(
        template.metadata.unwrap().annotations.unwrap()[contract::ANNOTATION_SPEC_HASH],
        spec_hash(&cluster, &resolved())
    );
    assert_eq!(
        template_hash(&stateful_set(&cluster, &resolved())),
        spec_hash(&cluster, &resolved())
    );
}

#[test]
fn config_map_renders_quoted_parameters_and_synchronous_standbys() {
    let mut cluster = cluster(3);
    cluster
        .spec
        .postgresql
        .parameters
        .insert("search_path".into(), "\"$user\", it's".into());
    cluster
        .spec
        .postgresql
        .pg_hba
        .push("hostssl all all 10.0.0.0/8 scram-sha-256".into());
    cluster.spec.replication = Some(ReplicationSpec {
        synchronous: Some(SynchronousReplication {
            method: SynchronousMethod::Any,
            number: 1,
            data_durability: Default::default(),
        }),
        max_lag_bytes: 0,
    });
    let data = config_map(&cluster).data.unwrap();
    let conf = &data[contract::CONFIG_KEY_POSTGRESQL];
    assert!(
        conf.contains("search_path = '\"$user\", it''s'\n"),
        "{conf}"
    );
    assert!(
        !conf.contains("synchronous_standby_names"),
        "the instance manager owns it"
    );
    let sts = stateful_set(&cluster, &resolved());
    let container = &sts.spec.unwrap().template.spec.unwrap().containers[0];
    let env = container.env.clone().unwrap();
    let standbys = env
        .iter()
        .find(|e| e.name == "SYNCHRONOUS_STANDBYS")
        .unwrap();
    assert_eq!(standbys.value.as_deref(), Some("1"));
    let value = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
            .unwrap()
    };
    assert_eq!(value("SYNCHRONOUS_METHOD"), "any");
    assert_eq!(value("SYNCHRONOUS_DURABILITY"), "required");
    cluster.spec.replication = Some(ReplicationSpec {
        synchronous: Some(SynchronousReplication {
            method: SynchronousMethod::First,
            number: 1,
            data_durability: api::postgres_cluster::DataDurability::Preferred,
        }),
        max_lag_bytes: 0,
    });
    let sts = stateful_set(&cluster, &resolved());
    let env = sts.spec.unwrap().template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    let value = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
            .unwrap()
    };
    assert_eq!(value("SYNCHRONOUS_METHOD"), "first");
    assert_eq!(value("SYNCHRONOUS_DURABILITY"), "preferred");
    assert_eq!(
        container.args.clone().unwrap(),
        [
            "--postgres-setting",
            "include_if_exists=/etc/postgres-operator/config/postgresql.conf"
        ]
    );
    let hba = &data[contract::CONFIG_KEY_PG_HBA];
    assert!(hba.starts_with("hostssl all all 10.0.0.0/8 scram-sha-256\n"));
    assert!(hba.contains("host replication streaming_replica all scram-sha-256"));
    assert_eq!(
        parameters::parse_conf(conf)["search_path"],
        "\"$user\", it's"
    );
}

#[test]
fn generated_passwords_are_long_random_and_distinct() {
    let first = generate_password();
    let second = generate_password();
    assert_eq!(first.len(), PASSWORD_LENGTH);
    assert!(first.chars().all(|c| c.is_ascii_alphanumeric()));
    assert_ne!(first, second);
}

#[test]
fn pdb_and_network_policy_select_the_instances() {
    let cluster = cluster(3);
    let pdb = pod_disruption_budget(&cluster).spec.unwrap();
    assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(
        pdb.selector.unwrap().match_labels.unwrap()[contract::LABEL_CLUSTER],
        "db"
    );
    let policy = network_policy(&cluster).spec.unwrap();
    let ports: Vec<_> = policy.ingress.unwrap()[0]
        .ports
        .clone()
        .unwrap()
        .into_iter()
        .map(|p| p.port.unwrap())
        .collect();
    assert_eq!(ports, [IntOrString::Int(5432), IntOrString::Int(8000)]);
}
