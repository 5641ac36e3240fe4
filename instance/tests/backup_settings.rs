//! `spec.backup`'s repository settings on real PostgreSQL 18, a real S3 server (moto, with its
//! request recorder) and a real kube-apiserver: `walArchiving: false` (no WAL archived, a base
//! backup that restores on its own), `region` (in the SigV4 scope of every request) and
//! `forcePathStyle` (path-style by default, virtual-hosted when false).

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::TestCluster;
use support::backup::*;
use testbed::ApiServer;
use testbed::object_store::S3Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_wal_archiving_only_a_backups_own_wal_is_uploaded_and_it_restores() {
    let scratch = tempfile::tempdir().unwrap();
    let store = S3Server::start(scratch.path()).unwrap();
    store.create_bucket(BUCKET).unwrap();
    store.start_recording().unwrap();
    let api = Arc::new(ApiServer::start().await.unwrap());
    let env = backup_env_with(&store, BUCKET, "noarch", None, |repository| {
        repository["walArchiving"] = false.into();
    });
    let cluster = TestCluster::start_with(api.clone(), "noarch", 1, 0, env)
        .await
        .expect("step: start the cluster");
    let primary = cluster
        .wait_for_primary_with_replicas(0, STARTUP)
        .await
        .expect("step: a primary serves");
    let client = cluster.connect(primary).await.unwrap();
    client
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY)")
        .await
        .unwrap();
    insert(&client, 1, 10).await;

    // PostgreSQL archives nothing, and no WAL reaches the store.
    let mode: String = client
        .query_one("SHOW archive_mode", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(mode, "off");
    switch_wal(&client).await;
    switch_wal(&client).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(archived_wal(&store, "noarch/noarch"), Vec::<String>::new());

    // A base backup still works: it uploads the WAL it needs, from its first segment to its last.
    let run = base_backup(&cluster, primary, "self-contained")
        .await
        .expect("step: the base backup");
    assert_eq!(run["phase"], "Completed", "{run}\n{}", cluster.logs());
    let (first, last) = (
        run["backup"]["beginWal"].as_str().unwrap(),
        run["backup"]["endWal"].as_str().unwrap(),
    );
    let needed = segments(first, last);
    assert_eq!(archived_wal(&store, "noarch/noarch"), needed, "{run}");
    // WAL written after the backup stays on the server.
    insert(&client, 11, 20).await;
    switch_wal(&client).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(archived_wal(&store, "noarch/noarch"), needed);

    // forcePathStyle (the default) and the default region, as the store saw them.
    let requests = store.recorded_requests();
    assert!(!requests.is_empty());
    let port = store.endpoint().rsplit(':').next().unwrap().to_string();
    for request in &requests {
        assert_eq!(request.host, format!("127.0.0.1:{port}"), "{request:?}");
        assert!(
            request.path().starts_with(&format!("/{BUCKET}")),
            "not path-style: {request:?}"
        );
        assert!(
            request.authorization.contains("/us-east-1/s3/aws4_request"),
            "{request:?}"
        );
    }

    // The backup restores on its own: the rows it holds, not those written after it.
    let (_restored, rows) = restore(
        &api,
        &store,
        "noarch-restored",
        recovery_spec(&store, "noarch", "noarch", None),
    )
    .await;
    assert_eq!(rows, range(1, 10));
}

/// `walArchiving: false` with `preferReplica`: the BackupJob controller sends the backup to a
/// replica, whose own `pg_wal` (streamed from the primary) must supply the WAL the backup needs,
/// and the backup restores alone (the end segment is the one the replica was still receiving).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_wal_archiving_a_backup_from_a_replica_carries_its_wal_and_restores_alone() {
    let scratch = tempfile::tempdir().unwrap();
    let store = S3Server::start(scratch.path()).unwrap();
    store.create_bucket(BUCKET).unwrap();
    let api = Arc::new(ApiServer::start().await.unwrap());
    let env = backup_env_with(&store, BUCKET, "noarchrep", None, |repository| {
        repository["walArchiving"] = false.into();
    });
    let cluster = TestCluster::start_with(api.clone(), "noarchrep", 2, 0, env)
        .await
        .expect("step: start the cluster");
    let primary = cluster
        .wait_for_primary_with_replicas(1, STARTUP)
        .await
        .expect("step: a primary and a streaming replica");
    let replica = 1 - primary;
    let client = cluster.connect(primary).await.unwrap();
    client
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY)")
        .await
        .unwrap();
    insert(&client, 1, 10).await;
    support::eventually("the replica has the rows", STARTUP, || async {
        cluster.connect(replica).await.is_ok() && ids(&cluster, replica).await == range(1, 10)
    })
    .await
    .unwrap();

    let run = base_backup(&cluster, replica, "from-replica")
        .await
        .expect("step: the base backup on the replica");
    assert_eq!(run["phase"], "Completed", "{run}\n{}", cluster.logs());
    let (first, last) = (
        run["backup"]["beginWal"].as_str().unwrap(),
        run["backup"]["endWal"].as_str().unwrap(),
    );
    assert_eq!(
        archived_wal(&store, "noarchrep/noarchrep"),
        segments(first, last),
        "{run}"
    );
    // Written after the backup: not in it.
    insert(&client, 11, 20).await;
    switch_wal(&client).await;

    let (_restored, rows) = restore(
        &api,
        &store,
        "noarchrep-restored",
        recovery_spec(&store, "noarchrep", "noarchrep", None),
    )
    .await;
    assert_eq!(rows, range(1, 10), "{}", cluster.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_region_and_virtual_hosted_addressing_reach_the_store() {
    let scratch = tempfile::tempdir().unwrap();
    let store = S3Server::start(scratch.path()).unwrap();
    store.create_bucket(BUCKET).unwrap();
    store.start_recording().unwrap();
    let api = Arc::new(ApiServer::start().await.unwrap());
    let port = store.endpoint().rsplit(':').next().unwrap().to_string();
    let mut env = backup_env_with(&store, BUCKET, "vhost", None, |repository| {
        repository["s3"]["endpoint"] = format!("http://localhost:{port}").into();
        repository["s3"]["forcePathStyle"] = false.into();
        repository["s3"]["region"] = "eu-central-1".into();
    });
    // Nothing resolves `backups.localhost` here: an HTTP proxy stands in for the DNS a
    // virtual-hosted store needs. It is the store itself (through its cuttable proxy), which
    // reads the bucket from the Host header.
    for name in ["HTTP_PROXY", "http_proxy"] {
        env.push((name.into(), format!("http://127.0.0.1:{port}")));
    }
    for name in ["NO_PROXY", "no_proxy"] {
        env.push((name.into(), "127.0.0.1".into()));
    }
    let cluster = TestCluster::start_with(api.clone(), "vhost", 1, 0, env)
        .await
        .expect("step: start the cluster");
    let primary = cluster
        .wait_for_primary_with_replicas(0, STARTUP)
        .await
        .expect("step: a primary serves");
    switch_and_wait_archived(&cluster, primary)
        .await
        .expect("step: WAL archiving");
    let run = base_backup(&cluster, primary, "vhost")
        .await
        .expect("step: the base backup");
    assert_eq!(run["phase"], "Completed", "{run}\n{}", cluster.logs());
    assert!(
        !archived_wal(&store, "vhost/vhost").is_empty(),
        "no WAL in the bucket"
    );

    let requests = store.recorded_requests();
    assert!(
        requests.iter().any(|request| request.method == "PUT"),
        "{requests:?}"
    );
    for request in &requests {
        assert_eq!(
            request.host,
            format!("{BUCKET}.localhost:{port}"),
            "not virtual-hosted: {request:?}"
        );
        assert!(
            !request.path().starts_with(&format!("/{BUCKET}")),
            "{request:?}"
        );
        assert!(
            request
                .authorization
                .contains("/eu-central-1/s3/aws4_request"),
            "the region is not in the signature's scope: {request:?}"
        );
    }
}
