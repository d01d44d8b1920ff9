//! Attacks on a running node by a clumsy operator or a curious caller, each
//! reproduced against real nodes: internal error text, another province's
//! node certificate, careless file modes.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use hufu_certs::Role;
use hufu_node::local::LocalProvince;
use hufu_proto::v1::LookupRequest;
use tonic::Code;

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test]
async fn internal_error_text_never_reaches_the_caller() {
    common::logs();
    let running = common::start("440000").await;
    let gd = &running.province;
    let holders = common::import_samples(gd, 2).await;
    // A stored record the node can no longer decode: the decoder's detail
    // (and in general paths, keys, data) must stay in the node's log.
    let tree = gd
        .node
        .as_ref()
        .unwrap()
        .state
        .store
        .db()
        .unwrap()
        .open_tree(hufu_node::store::TREE)
        .unwrap();
    let key = hufu_node::store::status_key(gd.province, &holders[0]).unwrap();
    // A verbatim record whose protobuf bytes do not decode.
    tree.insert(key, &[2, 0xff, 0xff, 0xff, 0x0f][..]).unwrap();

    let mut terminal = gd.terminal("gate").await.unwrap();
    let status = terminal
        .lookup(LookupRequest {
            issuer: "440000".into(),
            holder: holders[0].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    let message = status.message();
    assert!(message.contains("reference "), "{message}");
    for detail in ["decode", "corrupt", "protobuf", "storage", "sled"] {
        assert!(
            !message.to_lowercase().contains(detail),
            "{detail:?} leaked: {message}"
        );
    }
    // The node keeps serving the other holder.
    terminal
        .lookup(LookupRequest {
            issuer: "440000".into(),
            holder: holders[1].clone(),
        })
        .await
        .unwrap();
    let mut running = running;
    running.province.stop().await.unwrap();
}

#[tokio::test]
async fn serve_refuses_a_node_certificate_of_another_province_or_role() {
    let scratch = tempfile::tempdir().unwrap();
    let gd = LocalProvince::init(scratch.path(), common::province("440000")).unwrap();
    let sn = LocalProvince::init(scratch.path(), common::province("610000")).unwrap();

    // Shaanxi's node certificate in Guangdong's configuration.
    let mut config = gd.config.clone();
    config.node_cert = sn.config.path(&sn.config.node_cert);
    config.node_key = sn.config.path(&sn.config.node_key);
    let err = hufu_node::server::start(&config)
        .await
        .err()
        .expect("a node with another province's certificate started")
        .to_string();
    assert!(err.contains("names province 610000"), "{err}");
    assert!(err.contains("serves province 440000"), "{err}");

    // Guangdong's own admin certificate in the node's place.
    let mut config = gd.config.clone();
    config.node_cert = gd.config.path(&gd.config.client.admin_cert);
    config.node_key = gd.config.path(&gd.config.client.admin_key);
    let err = hufu_node::server::start(&config)
        .await
        .err()
        .expect("a node with an admin certificate started")
        .to_string();
    assert!(err.contains("not a node certificate"), "{err}");

    // The configuration as made by `hufu init` serves.
    let mut gd = gd;
    gd.start().await.unwrap();
    gd.stop().await.unwrap();
}

#[tokio::test]
async fn careless_modes_are_reported_and_a_world_writable_secret_directory_refuses_the_start() {
    let scratch = tempfile::tempdir().unwrap();
    let mut gd = LocalProvince::init(scratch.path(), common::province("440000")).unwrap();
    let issued = gd.dir.join("terminal/gate.key");
    hufu_node::init::issue_cert(
        &gd.dir,
        Role::Terminal,
        "gate",
        &hufu_certs::LeafOptions::default(),
    )
    .unwrap();
    let config = gd.config.clone();

    // `hufu init` leaves nothing to report.
    assert_eq!(
        hufu_node::preflight::check_permissions(&config).unwrap(),
        Vec::<String>::new()
    );

    // Every private file a node's directory holds, made world-readable.
    let private = [
        config.path(&config.holder_secret),
        config.path(&config.node_key),
        gd.dir.join("ca/ca.key"),
        config.path(&config.log_key),
        config.path(&config.governance_key),
        config.path(&config.client.admin_key),
        issued,
    ];
    let code_keys: Vec<_> = std::fs::read_dir(config.path(&config.codes.keys_dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pem"))
        .collect();
    assert!(!code_keys.is_empty());
    for file in private.iter().chain(&code_keys) {
        chmod(file, 0o644);
    }
    let warnings = hufu_node::preflight::check_permissions(&config).unwrap();
    for file in private.iter().chain(&code_keys) {
        assert!(
            warnings
                .iter()
                .any(|w| w.contains(&file.display().to_string()) && w.contains("chmod 600")),
            "no warning for {}: {warnings:#?}",
            file.display()
        );
    }
    // `hufu config check` reports them too.
    let report = hufu_node::config_check::check(&gd.dir.join("hufu.toml")).await;
    assert!(
        report.problems().any(|p| p.contains("chmod 600")),
        "{:?}",
        report.findings
    );
    // Readable by others is a warning: the node still starts.
    gd.start().await.unwrap();
    gd.stop().await.unwrap();

    // A world-writable directory holding a secret refuses the start.
    let secret_dir = config.path(&config.holder_secret);
    let secret_dir = secret_dir.parent().unwrap();
    chmod(secret_dir, 0o777);
    let err = gd.start().await.unwrap_err().to_string();
    assert!(err.contains("world-writable"), "{err}");
    assert!(err.contains(&secret_dir.display().to_string()), "{err}");
    assert!(!gd.is_running());
    chmod(secret_dir, 0o700);
}

fn serial_of(path: &Path) -> String {
    let pem = std::fs::read_to_string(path).unwrap();
    let der = <rustls::pki_types::CertificateDer<'_> as rustls::pki_types::pem::PemObject>::from_pem_slice(
        pem.as_bytes(),
    )
    .unwrap();
    hufu_certs::certificate_serial(&der).unwrap()
}

#[tokio::test]
async fn a_renewed_terminal_works_and_the_old_certificate_is_refused() {
    let mut running = common::start("440000").await;
    let gd = &running.province;
    let holders = common::import_samples(gd, 1).await;
    let dir = gd.dir.as_os_str();
    common::hufu_ok(&[
        "certs".as_ref(),
        "issue".as_ref(),
        "--dir".as_ref(),
        dir,
        "--role".as_ref(),
        "terminal".as_ref(),
        "--name".as_ref(),
        "gate-7".as_ref(),
    ])
    .await;
    let cert = gd.dir.join("terminal/gate-7.pem");
    let old = hufu_node::client::ClientCert::load(&cert, &cert.with_extension("key")).unwrap();
    let old_serial = serial_of(&cert);

    common::hufu_ok(&[
        "certs".as_ref(),
        "renew".as_ref(),
        "--dir".as_ref(),
        dir,
        "--cert".as_ref(),
        cert.as_os_str(),
        "--revoke-old".as_ref(),
    ])
    .await;
    assert_ne!(serial_of(&cert), old_serial);
    let renewed = hufu_node::client::ClientCert::load(&cert, &cert.with_extension("key")).unwrap();
    let ask = |cert: hufu_node::client::ClientCert| {
        let target = gd.target().unwrap();
        let holder = holders[0].clone();
        async move {
            let channel = hufu_node::client::connect(&target, &cert).await.ok()?;
            hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient::new(channel)
                .lookup(LookupRequest {
                    issuer: "440000".into(),
                    holder,
                })
                .await
                .ok()
        }
    };
    assert!(
        ask(renewed).await.is_some(),
        "the renewed certificate is refused"
    );
    // The node puts the revocation in force within a second or so.
    common::eventually(std::time::Duration::from_secs(5), || {
        let refused = ask(old.clone());
        async move { refused.await.is_none().then_some(()) }
    })
    .await;
    running.province.stop().await.unwrap();
}
