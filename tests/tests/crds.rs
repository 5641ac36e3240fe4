//! The generated CRDs on a real kube-apiserver: they install, every example is accepted with its
//! defaults filled in, and every CEL rule rejects bad input with the message a user needs.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};
use testbed::{ApiServer, manifests, paths};

/// The committed CRD YAML (deploy/crds), as `kubectl apply -k deploy/crds` would install it.
fn generated_crds() -> Vec<CustomResourceDefinition> {
    manifests::read_folder(&paths::workspace_root().join("deploy/crds"))
        .unwrap()
        .into_iter()
        .filter(|(_, doc)| doc["kind"] == "CustomResourceDefinition")
        .map(|(_, doc)| serde_json::from_value(doc).unwrap())
        .collect()
}

fn examples() -> Vec<(String, Value)> {
    manifests::read_folder(&paths::workspace_root().join("examples")).unwrap()
}

fn example(kind: &str) -> Value {
    examples()
        .into_iter()
        .map(|(_, doc)| doc)
        .find(|doc| doc["kind"] == kind)
        .unwrap_or_else(|| panic!("examples/ has a {kind}"))
}

/// JSON merge patch (RFC 7386): `null` removes a key.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

fn variant(kind: &str, name: &str, patch: Value) -> Value {
    let mut object = example(kind);
    object["metadata"]["name"] = json!(name);
    merge(&mut object, &patch);
    object
}

async fn started() -> (ApiServer, kube::Client) {
    let server = ApiServer::start().await.expect("control plane starts");
    server
        .install_crds(&generated_crds())
        .await
        .expect("every generated CRD installs and becomes Established");
    let client = server.client().await.unwrap();
    (server, client)
}

async fn expect_rejected(client: &kube::Client, what: &str, object: &Value, message: &str) {
    match manifests::apply(client, object, "default").await {
        Ok(_) => {
            panic!("{what}: the API server accepted it, expected a rejection saying {message:?}")
        }
        Err(kube::Error::Api(status)) => {
            assert!(status.code >= 400, "{what}: {status:?}");
            assert!(
                status.message.contains(message),
                "{what}: the rejection says {:?}, expected it to contain {message:?}",
                status.message
            );
        }
        Err(other) => panic!("{what}: unexpected error {other}"),
    }
}

async fn expect_accepted(client: &kube::Client, what: &str, object: &Value) {
    if let Err(error) = manifests::apply(client, object, "default").await {
        panic!("{what}: rejected: {error}");
    }
}

#[tokio::test]
async fn generated_crds_install_and_every_example_is_stored_with_defaults() {
    let (_server, client) = started().await;
    let examples = examples();
    let kinds: std::collections::BTreeSet<String> = examples
        .iter()
        .map(|(_, doc)| doc["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        kinds.len(),
        10,
        "examples/ holds one sample of each of the ten kinds: {kinds:?}"
    );

    let stored = manifests::apply_all(&client, &examples, "default")
        .await
        .expect("every example is valid");
    assert_eq!(stored.len(), examples.len());

    // Each stored object also reads back into its typed struct.
    for object in &stored {
        let value = serde_json::to_value(object).unwrap();
        let kind = value["kind"].as_str().unwrap().to_string();
        let typed = match kind.as_str() {
            "PostgresCluster" => serde_json::from_value::<api::PostgresCluster>(value).map(drop),
            "BackupJob" => serde_json::from_value::<api::BackupJob>(value).map(drop),
            "ScheduledBackup" => serde_json::from_value::<api::ScheduledBackup>(value).map(drop),
            "PostgresDatabase" => serde_json::from_value::<api::PostgresDatabase>(value).map(drop),
            "PostgresUser" => serde_json::from_value::<api::PostgresUser>(value).map(drop),
            "Pooler" => serde_json::from_value::<api::Pooler>(value).map(drop),
            "ImageCatalog" => serde_json::from_value::<api::ImageCatalog>(value).map(drop),
            "ClusterImageCatalog" => {
                serde_json::from_value::<api::ClusterImageCatalog>(value).map(drop)
            }
            "ShardRange" => serde_json::from_value::<api::ShardRange>(value).map(drop),
            "ShardSplitJob" => serde_json::from_value::<api::ShardSplitJob>(value).map(drop),
            other => panic!("unexpected kind {other}"),
        };
        typed.unwrap_or_else(|e| panic!("stored {kind} reads into its type: {e}"));
    }

    // The API server fills in the schema defaults: the user gets documented behaviour, not nulls.
    let clusters: kube::Api<api::PostgresCluster> =
        kube::Api::namespaced(client.clone(), "default");
    let demo = clusters.get("demo").await.unwrap();
    let stored = serde_json::to_value(&demo).unwrap();
    let raw_spec = &stored["spec"];
    assert_eq!(raw_spec["failover"]["leaseDurationSeconds"], 4);
    assert_eq!(raw_spec["failover"]["renewDeadlineSeconds"], 2);
    assert_eq!(raw_spec["replication"]["maxLagBytes"], 16 * 1024 * 1024);
    assert_eq!(raw_spec["bootstrap"]["initdb"]["dataChecksums"], true);
    let with_backup = variant(
        "PostgresCluster",
        "with-backup",
        json!({"spec": {"backup": {"s3": {
            "endpoint": "http://minio.backup.svc:9000",
            "bucket": "backups",
            "credentialsSecret": {"name": "backup-credentials"}
        }}}}),
    );
    manifests::apply(&client, &with_backup, "default")
        .await
        .expect("a cluster with an object store is valid");
    let stored = serde_json::to_value(clusters.get("with-backup").await.unwrap()).unwrap();
    assert_eq!(stored["spec"]["backup"]["s3"]["region"], "us-east-1");

    let poolers: kube::Api<api::Pooler> = kube::Api::namespaced(client.clone(), "default");
    let pooler = serde_json::to_value(poolers.get("demo-pooler-rw").await.unwrap()).unwrap();
    assert_eq!(pooler["spec"]["pgbouncer"]["parameters"], Value::Null);
    // `kubectl get pgbackup -o wide` names the backup and, for a volume, the claim to restore
    // from (the API server computes the columns; read as kubectl reads them, as a Table).
    let jobs: kube::Api<api::BackupJob> = kube::Api::namespaced(client.clone(), "default");
    jobs.patch_status(
        "demo-manual-backup",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"status": {"phase": "Completed",
            "backupId": "20261206T101500", "volumeClaim": "demo-manual-backup"}})),
    )
    .await
    .unwrap();
    let request = http::Request::get(
        "/apis/postgres.keiailab.io/v1alpha1/namespaces/default/backupjobs/demo-manual-backup",
    )
    .header(
        "Accept",
        "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
    )
    .body(Vec::new())
    .unwrap();
    let table: Value = client.request(request).await.unwrap();
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|column| column["name"].as_str().unwrap())
        .collect();
    let cell = |name: &str| {
        let index = columns.iter().position(|column| *column == name);
        index.map(|index| table["rows"][0]["cells"][index].clone())
    };
    assert_eq!(cell("Phase"), Some(json!("Completed")), "{columns:?}");
    assert_eq!(
        cell("Backup"),
        Some(json!("20261206T101500")),
        "{columns:?}"
    );
    assert_eq!(
        cell("Claim"),
        Some(json!("demo-manual-backup")),
        "{columns:?}"
    );
    let users: kube::Api<api::PostgresUser> = kube::Api::namespaced(client, "default");
    let user = serde_json::to_value(users.get("demo-inventory").await.unwrap()).unwrap();
    assert_eq!(
        user["spec"]["attributes"]["inherit"], true,
        "defaults inside nested objects"
    );
    assert_eq!(user["spec"]["reclaimPolicy"], "Retain");
}

#[tokio::test]
async fn cel_rules_reject_invalid_new_objects_with_a_message_that_says_what_to_fix() {
    let (_server, client) = started().await;
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "PostgreSQL 17",
            variant(
                "PostgresCluster",
                "v17",
                json!({"spec": {"postgresVersion": 17}}),
            ),
            "PostgreSQL major versions below 18 are not supported",
        ),
        (
            "zero instances",
            variant(
                "PostgresCluster",
                "zero",
                json!({"spec": {"instances": 0, "replication": null}}),
            ),
            "instances must be at least 1",
        ),
        (
            "as many synchronous standbys as instances",
            variant(
                "PostgresCluster",
                "sync",
                json!({"spec": {"instances": 2, "replication": {"synchronous": {"number": 2}}}}),
            ),
            "replication.synchronous.number must be lower than instances",
        ),
        (
            "image and imageCatalogRef",
            variant(
                "PostgresCluster",
                "both",
                json!({"spec": {"image": "postgres:18"}}),
            ),
            "set exactly one of image or imageCatalogRef",
        ),
        (
            "neither image nor imageCatalogRef",
            variant(
                "PostgresCluster",
                "neither",
                json!({"spec": {"imageCatalogRef": null}}),
            ),
            "set exactly one of image or imageCatalogRef",
        ),
        (
            "storage size that is no quantity",
            variant(
                "PostgresCluster",
                "size",
                json!({"spec": {"storage": {"size": "ten gigs"}}}),
            ),
            "size must be a positive Kubernetes quantity",
        ),
        (
            "operator-managed parameter",
            variant(
                "PostgresCluster",
                "port",
                json!({"spec": {"postgresql": {"parameters": {"port": "5433"}}}}),
            ),
            "postgresql.parameters may not set settings the operator manages",
        ),
        (
            "malformed pg_hba line",
            variant(
                "PostgresCluster",
                "hba",
                json!({"spec": {"postgresql": {"pgHba": ["allow everyone please"]}}}),
            ),
            "each pg_hba line must start with local, host",
        ),
        (
            "initdb and recovery together",
            variant(
                "PostgresCluster",
                "boot",
                json!({"spec": {"bootstrap": {"recovery": {
                    "source": {"endpoint": "http://s3:9000", "bucket": "backups", "credentialsSecret": {"name": "s3"}},
                    "sourceCluster": "old"
                }}}}),
            ),
            "bootstrap.initdb creates an empty cluster: it cannot be combined with recovery",
        ),
        (
            "two recovery targets",
            variant(
                "PostgresCluster",
                "pitr",
                json!({"spec": {"bootstrap": {"initdb": null, "recovery": {
                    "source": {"endpoint": "http://s3:9000", "bucket": "backups", "credentialsSecret": {"name": "s3"}},
                    "sourceCluster": "old",
                    "target": {"time": "2026-11-24T10:00:00Z", "lsn": "0/3000060"}
                }}}}),
            ),
            "a recovery target takes exactly one of time, lsn, xid or name",
        ),
        (
            "recovery time that is no timestamp",
            variant(
                "PostgresCluster",
                "pitrtime",
                json!({"spec": {"bootstrap": {"initdb": null, "recovery": {
                    "source": {"endpoint": "http://s3:9000", "bucket": "backups", "credentialsSecret": {"name": "s3"}},
                    "sourceCluster": "old",
                    "target": {"time": "yesterday"}
                }}}}),
            ),
            "target.time must be an RFC 3339 timestamp",
        ),
        (
            "renew deadline not below the lease duration",
            variant(
                "PostgresCluster",
                "lease",
                json!({"spec": {"failover": {"leaseDurationSeconds": 4, "renewDeadlineSeconds": 4}}}),
            ),
            "failover.renewDeadlineSeconds must be lower than leaseDurationSeconds",
        ),
        (
            "object store endpoint without scheme",
            variant(
                "PostgresCluster",
                "s3",
                json!({"spec": {"backup": {"s3": {
                    "endpoint": "minio:9000",
                    "bucket": "backups",
                    "credentialsSecret": {"name": "backup-credentials"}
                }}}}),
            ),
            "endpoint must be an http:// or https:// URL",
        ),
        (
            "cert-manager mode without issuer",
            variant(
                "PostgresCluster",
                "tls",
                json!({"spec": {"tls": {"mode": "CertManager"}}}),
            ),
            "tls.mode CertManager needs tls.certManager.issuerRef",
        ),
        (
            "zero shards",
            variant(
                "PostgresCluster",
                "shards",
                json!({"spec": {"sharding": {"shards": 0}}}),
            ),
            "sharding.shards must be between 1 and 256",
        ),
        (
            "a volume and an object-store backup to restore",
            variant(
                "PostgresCluster",
                "bootvol",
                json!({"spec": {"bootstrap": {"initdb": null, "volume": {"claimName": "nightly"}, "recovery": {
                    "source": {"endpoint": "http://s3:9000", "bucket": "backups", "credentialsSecret": {"name": "s3"}},
                    "sourceCluster": "old", "backupId": "20261206T000000"
                }}}}),
            ),
            "with bootstrap.volume the base backup is the volume: remove recovery.backupId",
        ),
        (
            "initdb and a volume",
            variant(
                "PostgresCluster",
                "initvol",
                json!({"spec": {"bootstrap": {"volume": {"claimName": "nightly"}}}}),
            ),
            "bootstrap.initdb creates an empty cluster",
        ),
        (
            "a sharded cluster restored from one volume",
            variant(
                "PostgresCluster",
                "shardvol",
                json!({"spec": {"sharding": {"shards": 2}, "bootstrap": {"initdb": null, "volume": {"claimName": "nightly"}}}}),
            ),
            "a sharded cluster cannot be restored from one volume",
        ),
        (
            "a lookup vindex on the shard key",
            variant(
                "PostgresCluster",
                "lookupkey",
                json!({"spec": {"sharding": {"shards": 2,
                    "tableGroups": [{"name": "users"}],
                    "shardedTables": [{"name": "users", "tableGroup": "users", "shardKey": "id",
                                       "lookups": [{"column": "id", "table": "users_id_lookup"}]}]}}}),
            ),
            "the shard key routes by itself",
        ),
        (
            "a lookup table that is a reference table",
            variant(
                "PostgresCluster",
                "lookupref",
                json!({"spec": {"sharding": {"shards": 2,
                    "tableGroups": [{"name": "users"}],
                    "shardedTables": [{"name": "users", "tableGroup": "users", "shardKey": "id",
                                       "lookups": [{"column": "email", "table": "countries"}]}],
                    "referenceTables": ["countries"]}}}),
            ),
            "so it may not be a reference table",
        ),
        (
            "a backup volume of no size",
            variant(
                "BackupJob",
                "volsize",
                json!({"spec": {"volume": {"size": "0"}}}),
            ),
            "size must be a positive Kubernetes quantity",
        ),
        (
            "restore over a running cluster",
            variant("BackupJob", "bj", json!({"spec": {"action": "Restore"}})),
            "a BackupJob never restores over a running cluster",
        ),
        (
            "pgBackRest backup",
            variant(
                "BackupJob",
                "pgbr",
                json!({"spec": {"method": "pgBackRest"}}),
            ),
            "method pgBackRest is not available",
        ),
        (
            "incremental backup",
            variant("BackupJob", "incr", json!({"spec": {"backupType": "incr"}})),
            "barman-cloud takes full backups only",
        ),
        (
            "scheduled pgBackRest backups",
            variant(
                "ScheduledBackup",
                "pgbr",
                json!({"spec": {"method": "pgBackRest"}}),
            ),
            "method pgBackRest is not available",
        ),
        (
            "schedule in words",
            variant(
                "ScheduledBackup",
                "words",
                json!({"spec": {"schedule": "every day at three"}}),
            ),
            "schedule must be a cron expression with five fields",
        ),
        (
            "schedule with four fields",
            variant(
                "ScheduledBackup",
                "four",
                json!({"spec": {"schedule": "0 3 * *"}}),
            ),
            "schedule must be a cron expression with five fields",
        ),
        (
            "database named postgres",
            variant(
                "PostgresDatabase",
                "pgdb",
                json!({"spec": {"name": "postgres"}}),
            ),
            "name may not be postgres, template0 or template1",
        ),
        (
            "schema in the pg_ namespace",
            variant(
                "PostgresDatabase",
                "schema",
                json!({"spec": {"schemas": [{"name": "pg_mine"}]}}),
            ),
            "schema names starting with pg_ are reserved",
        ),
        (
            "role in the pg_ namespace",
            variant(
                "PostgresUser",
                "pgrole",
                json!({"spec": {"roleName": "pg_admin"}}),
            ),
            "role names starting with pg_ are reserved",
        ),
        (
            "operator-owned role",
            variant(
                "PostgresUser",
                "repl",
                json!({"spec": {"roleName": "streaming_replica"}}),
            ),
            "roleName may not be postgres, streaming_replica or pgbouncer_auth",
        ),
        (
            "the pooler's role",
            variant(
                "PostgresUser",
                "pooler",
                json!({"spec": {"roleName": "pgbouncer_auth"}}),
            ),
            "those roles belong to the operator",
        ),
        (
            "application owner with a reserved name",
            variant(
                "PostgresCluster",
                "pgowner",
                json!({"spec": {"bootstrap": {"initdb": {"owner": "pg_app"}}}}),
            ),
            "owner may not start with pg_",
        ),
        (
            "the superuser as application owner",
            variant(
                "PostgresCluster",
                "suowner",
                json!({"spec": {"bootstrap": {"initdb": {"owner": "postgres"}}}}),
            ),
            "owner may not be postgres, streaming_replica or pgbouncer_auth",
        ),
        (
            "a template as application database",
            variant(
                "PostgresCluster",
                "tpldb",
                json!({"spec": {"bootstrap": {"initdb": {"database": "template1"}}}}),
            ),
            "database may not be postgres, template0 or template1",
        ),
        (
            "rotation of a password the operator does not generate",
            variant(
                "PostgresUser",
                "rotate",
                json!({"spec": {"password": {"secretName": "mine", "generate": false, "rotationDays": 30}}}),
            ),
            "password.rotationDays needs generate: true",
        ),
        (
            "pool larger than the client limit",
            variant(
                "Pooler",
                "pool",
                json!({"spec": {"pgbouncer": {"defaultPoolSize": 50, "maxClientConn": 10}}}),
            ),
            "pgbouncer.maxClientConn must be at least defaultPoolSize",
        ),
        (
            "catalog with a major twice",
            variant(
                "ImageCatalog",
                "dup",
                json!({"spec": {"images": [{"major": 18, "image": "a"}, {"major": 18, "image": "b"}]}}),
            ),
            "images must list each major version once",
        ),
        (
            "catalog with PostgreSQL 17",
            variant(
                "ImageCatalog",
                "old",
                json!({"spec": {"images": [{"major": 17, "image": "a"}]}}),
            ),
            "catalog entries must be 18 or newer",
        ),
        (
            "cluster catalog with PostgreSQL 16",
            variant(
                "ClusterImageCatalog",
                "old-global",
                json!({"spec": {"images": [{"major": 16, "image": "a"}]}}),
            ),
            "catalog entries must be 18 or newer",
        ),
        (
            "inherited label that is the operator's own",
            variant(
                "PostgresCluster",
                "ownlabel",
                json!({"spec": {"inheritedMetadata": {"labels": {"postgres.keiailab.io/role": "primary"}}}}),
            ),
            "inheritedMetadata.labels may not set the operator's own labels",
        ),
        (
            "inherited label with a value Kubernetes refuses",
            variant(
                "PostgresCluster",
                "badvalue",
                json!({"spec": {"inheritedMetadata": {"labels": {"team": "pay ments"}}}}),
            ),
            "each inheritedMetadata.labels value must be a Kubernetes label value",
        ),
        (
            "inherited annotation with a key Kubernetes refuses",
            variant(
                "PostgresCluster",
                "badkey",
                json!({"spec": {"inheritedMetadata": {"annotations": {"-cost": "1"}}}}),
            ),
            "each inheritedMetadata.annotations key must be a Kubernetes annotation key",
        ),
        (
            "inherited annotation that is the operator's own",
            variant(
                "PostgresCluster",
                "ownannotation",
                json!({"spec": {"inheritedMetadata": {"annotations": {"postgres.keiailab.io/fenced": "true"}}}}),
            ),
            "inheritedMetadata.annotations may not set the operator's own annotations",
        ),
        (
            "source ranges on a ClusterIP Service",
            variant(
                "PostgresCluster",
                "ranges",
                json!({"spec": {"services": {"readWrite": {"loadBalancerSourceRanges": ["10.0.0.0/8"]}}}}),
            ),
            "loadBalancerSourceRanges needs type: LoadBalancer",
        ),
        (
            "a source range that is no CIDR",
            variant(
                "PostgresCluster",
                "cidr",
                json!({"spec": {"services": {"readWrite": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.300/8"]}}}}),
            ),
            "each loadBalancerSourceRanges entry must be a CIDR",
        ),
        (
            "extra certificate names without TLS",
            variant(
                "PostgresCluster",
                "notls",
                json!({"spec": {"tls": {"mode": "Disabled", "serverAltDnsNames": ["db.example.com"]}}}),
            ),
            "tls.serverAltDnsNames needs TLS",
        ),
        (
            "an extra certificate name that is no DNS name",
            variant(
                "PostgresCluster",
                "badname",
                json!({"spec": {"tls": {"serverAltDnsNames": ["DB Example"]}}}),
            ),
            "each serverAltDnsNames entry must be a lowercase DNS name",
        ),
        (
            "an env variable the operator sets",
            variant(
                "PostgresCluster",
                "ownenv",
                json!({"spec": {"env": [{"name": "PGDATA", "value": "/elsewhere"}]}}),
            ),
            "env may not set a variable the operator sets",
        ),
        (
            "a replica cluster without a source",
            variant(
                "PostgresCluster",
                "replicanosource",
                json!({"spec": {"replica": {"enabled": true}}}),
            ),
            "replica.enabled needs bootstrap.recovery",
        ),
        (
            "a replica cluster with a recovery target",
            variant(
                "PostgresCluster",
                "replicatarget",
                json!({"spec": {"replica": {"enabled": true}, "bootstrap": {"initdb": null, "recovery": {
                    "source": {"endpoint": "http://s3:9000", "bucket": "backups", "credentialsSecret": {"name": "keys"}},
                    "sourceCluster": "main", "target": {"name": "before"}}}}}),
            ),
            "a replica cluster follows its source to the end of the WAL archive",
        ),
        (
            "a replica cluster without TLS",
            variant(
                "PostgresCluster",
                "replicanotls",
                json!({"spec": {"replica": {"enabled": true}, "tls": {"mode": "Disabled"}, "bootstrap": {"initdb": null, "recovery": {
                    "source": {"endpoint": "http://s3:9000", "bucket": "backups", "credentialsSecret": {"name": "keys"}},
                    "sourceCluster": "main"}}}}),
            ),
            "a replica cluster needs TLS",
        ),
        (
            "a Pooler certificate name that is no DNS name",
            variant(
                "Pooler",
                "poolname",
                json!({"spec": {"pgbouncer": {"serverAltDnsNames": ["pool_example"]}}}),
            ),
            "each serverAltDnsNames entry must be a lowercase DNS name",
        ),
        (
            "empty shard range",
            variant(
                "ShardRange",
                "empty",
                json!({"spec": {"start": 10, "end": 10}}),
            ),
            "start must be lower than end",
        ),
    ];
    for (what, object, message) in &cases {
        expect_rejected(&client, what, object, message).await;
    }

    expect_accepted(
        &client,
        "inherited labels and annotations as teams write them",
        &variant(
            "PostgresCluster",
            "inherited",
            json!({"spec": {"inheritedMetadata": {
                "labels": {"team": "payments", "example.com/cost-center": "cc-42", "empty": ""},
                "annotations": {"sidecar.istio.io/inject": "false", "note": "any text, even with spaces"}
            },
            "tls": {"serverAltDnsNames": ["db.example.com", "*.db.example.org"]},
            "env": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"},
                    {"name": "NO_PROXY", "valueFrom": {"configMapKeyRef": {"name": "proxy", "key": "no_proxy"}}}],
            "services": {
                "readWrite": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/8", "2001:db8::/32"],
                              "annotations": {"service.beta.kubernetes.io/aws-load-balancer-internal": "true"}},
                "readOnly": {"type": "NodePort"}
            }}}),
        ),
    )
    .await;

    // Plain schema checks (types, enums) answer clearly too.
    expect_rejected(
        &client,
        "instances as a word",
        &variant(
            "PostgresCluster",
            "word",
            json!({"spec": {"instances": "three"}}),
        ),
        "spec.instances",
    )
    .await;
    expect_rejected(
        &client,
        "unknown primary update strategy",
        &variant(
            "PostgresCluster",
            "strategy",
            json!({"spec": {"primaryUpdateStrategy": "manual"}}),
        ),
        "supported values: \"unsupervised\", \"supervised\"",
    )
    .await;
    expect_accepted(
        &client,
        "a sharded table with a lookup vindex",
        &variant(
            "PostgresCluster",
            "lookup",
            json!({"spec": {"sharding": {"shards": 2,
                "tableGroups": [{"name": "users"}],
                "shardedTables": [{"name": "users", "tableGroup": "users", "shardKey": "id",
                                   "lookups": [{"column": "email", "table": "users_email_lookup"}]}]}}}),
        ),
    )
    .await;
    expect_accepted(
        &client,
        "a backup to a volume",
        &variant(
            "BackupJob",
            "tovolume",
            json!({"spec": {"volume": {"size": "2Gi", "storageClass": "fast"}}}),
        ),
    )
    .await;
    expect_accepted(
        &client,
        "a cluster restored from a volume",
        &variant(
            "PostgresCluster",
            "fromvolume",
            json!({"spec": {"bootstrap": {"initdb": null, "volume": {"claimName": "tovolume"}}}}),
        ),
    )
    .await;
    expect_accepted(
        &client,
        "a volume replayed to a point in time from its cluster's archive",
        &variant(
            "PostgresCluster",
            "volumepitr",
            json!({"spec": {"bootstrap": {"initdb": null, "volume": {"claimName": "tovolume"}, "recovery": {
                "source": {"endpoint": "http://s3:9000", "bucket": "backups", "credentialsSecret": {"name": "s3"}},
                "sourceCluster": "old", "target": {"name": "before-migration"}
            }}}}),
        ),
    )
    .await;
    expect_rejected(
        &client,
        "unknown pool mode",
        &variant(
            "Pooler",
            "mode",
            json!({"spec": {"pgbouncer": {"poolMode": "fast"}}}),
        ),
        "Unsupported value: \"fast\"",
    )
    .await;
}

#[tokio::test]
async fn transition_rules_guard_immutable_fields_and_allow_valid_changes() {
    let (_server, client) = started().await;
    let base = variant(
        "PostgresCluster",
        "sharded",
        json!({"spec": {"storage": {"storageClass": "fast"}, "sharding": {"shards": 2}}}),
    );
    expect_accepted(&client, "the base cluster", &base).await;

    let changed = |patch: Value| {
        let mut object = base.clone();
        merge(&mut object, &patch);
        object
    };
    let rejected_updates: Vec<(&str, Value, &str)> = vec![
        (
            "another storage class",
            changed(json!({"spec": {"storage": {"storageClass": "slow"}}})),
            "storageClass is immutable",
        ),
        (
            "a smaller volume",
            changed(json!({"spec": {"storage": {"size": "5Gi"}}})),
            "size cannot shrink",
        ),
        (
            "another shard count without a ShardSplitJob",
            changed(json!({"spec": {"sharding": {"shards": 3}}})),
            "sharding.shards cannot be changed (nor sharding removed): a ShardSplitJob adds a shard",
        ),
        (
            "a major upgrade, which the operator cannot run",
            changed(json!({"spec": {"postgresVersion": 19}})),
            "postgresVersion is immutable: this operator does not run major upgrades",
        ),
        (
            "a major downgrade",
            changed(json!({"spec": {"postgresVersion": 17}})),
            "postgresVersion is immutable",
        ),
        (
            "a new bootstrap",
            changed(json!({"spec": {"bootstrap": {"initdb": {"database": "other"}}}})),
            "bootstrap is immutable",
        ),
    ];
    for (what, object, message) in &rejected_updates {
        expect_rejected(&client, what, object, message).await;
    }

    expect_accepted(
        &client,
        "a larger volume",
        &changed(json!({"spec": {"storage": {"size": "20Gi"}}})),
    )
    .await;

    let unsharded = variant("PostgresCluster", "single", json!({}));
    expect_accepted(&client, "an unsharded cluster", &unsharded).await;
    let mut sharding_on = unsharded.clone();
    merge(
        &mut sharding_on,
        &json!({"spec": {"sharding": {"shards": 2}}}),
    );
    expect_rejected(
        &client,
        "sharding turned on later",
        &sharding_on,
        "sharding cannot be turned on for an existing cluster",
    )
    .await;

    // A replica cluster is created as one and may only be promoted.
    let replica = variant(
        "PostgresCluster",
        "dr",
        json!({"spec": {"replica": {"enabled": true}, "bootstrap": {"initdb": null, "recovery": {
            "source": {"endpoint": "http://s3:9000", "bucket": "backups", "credentialsSecret": {"name": "keys"}},
            "sourceCluster": "main"}}}}),
    );
    expect_accepted(&client, "a replica cluster", &replica).await;
    let mut promoted = replica.clone();
    merge(
        &mut promoted,
        &json!({"spec": {"replica": {"enabled": false}}}),
    );
    expect_accepted(&client, "a promoted replica cluster", &promoted).await;
    expect_rejected(
        &client,
        "a promoted cluster made a replica again",
        &replica,
        "replica.enabled can be turned off (which promotes the cluster) but not on",
    )
    .await;
    let mut made_replica = unsharded.clone();
    merge(
        &mut made_replica,
        &json!({"spec": {"replica": {"enabled": true}}}),
    );
    expect_rejected(
        &client,
        "an existing cluster made a replica cluster",
        &made_replica,
        "replica.enabled needs bootstrap.recovery",
    )
    .await;

    // Immutable specs of the other kinds.
    let job = example("BackupJob");
    expect_accepted(&client, "a BackupJob", &job).await;
    let mut other_job = job.clone();
    merge(&mut other_job, &json!({"spec": {"backupType": "diff"}}));
    expect_rejected(
        &client,
        "a changed BackupJob",
        &other_job,
        "a BackupJob's spec is immutable",
    )
    .await;

    let database = example("PostgresDatabase");
    expect_accepted(&client, "a database", &database).await;
    let mut renamed = database.clone();
    merge(&mut renamed, &json!({"spec": {"name": "inventory2"}}));
    expect_rejected(&client, "a renamed database", &renamed, "name is immutable").await;

    let user = example("PostgresUser");
    expect_accepted(&client, "a user", &user).await;
    let mut renamed = user.clone();
    merge(&mut renamed, &json!({"spec": {"roleName": "inventory2"}}));
    expect_rejected(&client, "a renamed role", &renamed, "roleName is immutable").await;

    let range = example("ShardRange");
    expect_accepted(&client, "a range", &range).await;
    let mut moved = range.clone();
    merge(&mut moved, &json!({"spec": {"tableGroup": "customers"}}));
    expect_rejected(
        &client,
        "a range moved to another table group",
        &moved,
        "cluster and tableGroup are immutable",
    )
    .await;

    let split = example("ShardSplitJob");
    expect_accepted(&client, "a split", &split).await;
    let mut resplit = split.clone();
    merge(&mut resplit, &json!({"spec": {"targetShard": "shard-9"}}));
    expect_rejected(
        &client,
        "a changed split",
        &resplit,
        "a ShardSplitJob's spec is immutable",
    )
    .await;
}
