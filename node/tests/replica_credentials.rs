//! A replica's credentials to NATS: against a real nats-server that asks
//! for a user and password, a replica given them writes through the
//! province's write log; given a wrong password, its writes fail with
//! UNAVAILABLE and a message naming the refusal and the settings to check,
//! while lookups go on from its store.

mod common;

use common::province;
use common::replicas::{colour_of, put, put_until_taken};
use hufu_node::config::ReplicationConfig;
use hufu_node::local::LocalProvince;
use hufu_node::replication::cluster::NatsCluster;
use hufu_proto::v1::Colour;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_writes_with_its_nats_password_and_says_so_when_it_is_refused() {
    let scratch = tempfile::tempdir().unwrap();
    let nats =
        NatsCluster::start_with_user(&scratch.path().join("nats"), 3, Some(("hufu", "s3cret-pw")))
            .await
            .unwrap();
    let mut gd = LocalProvince::init(&scratch.path().join("gd"), province("440000")).unwrap();
    common::quick(&mut gd.config);
    let password = std::path::PathBuf::from("nats.password");
    std::fs::write(gd.config.path(&password), "s3cret-pw\n").unwrap();
    let mut replication = ReplicationConfig::new(nats.urls());
    replication.replicas = 1;
    replication.ack_timeout_ms = 2000;
    replication.user = Some("hufu".into());
    replication.password_file = Some(password.clone());
    gd.config.replication = Some(replication);

    gd.start().await.unwrap();
    assert_eq!(put_until_taken(&gd, 1, Colour::Green).await, 1);
    gd.stop().await.unwrap();

    // The same replica with a wrong password.
    std::fs::write(gd.config.path(&password), "not-the-password\n").unwrap();
    gd.start().await.unwrap();
    let refused = put(&gd, 2, Colour::Red).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    for words in ["authorization violation", "replication.password_file"] {
        assert!(refused.message().contains(words), "{}", refused.message());
    }
    // What it holds is still answered.
    assert_eq!(colour_of(&gd, 1).await, Colour::Green as i32);
    gd.stop().await.unwrap();
    drop(nats);
}
