//! Attacks on a running node by a clumsy operator, a curious caller or a
//! careless issuer, each reproduced against real nodes: internal error
//! text, another province's node certificate, careless file modes, a sub-CA
//! under a province CA, codes with `crit` or issued in the future.

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
    let (logs, _guard) = common::capture_logs();
    let running = common::start("440000").await;
    let gd = &running.province;
    let holders = common::import_samples(gd, 2).await;
    // A stored record the node can no longer decode: the decoder's detail
    // (and in general paths, keys, data) must stay in the node's log. The
    // statuses are merged into their buckets first, where it is damaged.
    let store = &gd.node.as_ref().unwrap().state.store;
    store.merge().await.unwrap();
    let tree = store
        .db()
        .unwrap()
        .open_tree(hufu_node::store::TREE)
        .unwrap();
    use hufu_node::store::{bucket, codec};
    let holder = codec::holder_bytes(&holders[0]).unwrap();
    let (low, stored) = bucket::find(&tree, gd.province, &holder).unwrap().unwrap();
    // A verbatim record whose protobuf bytes do not decode.
    let damaged = bucket::with_status(&stored, &holder, vec![2, 0xff, 0xff, 0xff, 0x0f]).unwrap();
    tree.insert(bucket::bucket_key(gd.province, &low), damaged)
        .unwrap();

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
    // The node's log has the detail under the reference the caller got.
    let reference = message
        .split("reference ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap();
    let logged = logs.text();
    let line = logged
        .lines()
        .find(|l| l.contains(reference))
        .unwrap_or_else(|| panic!("no log line with reference {reference}: {logged}"));
    assert!(line.contains("corrupt stored record"), "{line}");
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

fn cert_der(path: &Path) -> rustls::pki_types::CertificateDer<'static> {
    let pem = std::fs::read_to_string(path).unwrap();
    <rustls::pki_types::CertificateDer<'_> as rustls::pki_types::pem::PemObject>::from_pem_slice(
        pem.as_bytes(),
    )
    .unwrap()
}

fn serial_of(path: &Path) -> String {
    hufu_certs::certificate_serial(&cert_der(path)).unwrap()
}

/// Days from now until the certificate at `path` expires.
fn days_left(path: &Path) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    (hufu_certs::not_after(&cert_der(path)).unwrap() - now) / 86_400
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
    // Terminal certificates are short-lived unless asked otherwise.
    assert!(
        (29..=30).contains(&days_left(&cert)),
        "a terminal certificate lives 30 days"
    );

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
    assert!(
        (29..=30).contains(&days_left(&cert)),
        "a renewed terminal certificate lives 30 days"
    );
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

/// An admin certificate of `gd`'s province issued by a sub-CA that `gd`'s
/// own CA signed (as a careless operator might), chain PEM leaf first.
fn admin_through_a_sub_ca(gd: &LocalProvince) -> hufu_node::client::ClientCert {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType};
    let ca = hufu_node::init::load_ca(&gd.dir).unwrap();
    let ca_key = KeyPair::from_pem(&ca.key_pem()).unwrap();
    let ca_issuer = rcgen::Issuer::from_ca_cert_der(&ca.cert_der(), ca_key).unwrap();
    let sub_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut sub = CertificateParams::default();
    sub.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    sub.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    sub.subject_alt_names = vec![SanType::URI(
        hufu_certs::ca_uri(gd.province).try_into().unwrap(),
    )];
    let sub_cert = sub.signed_by(&sub_key, &ca_issuer).unwrap();
    let sub_issuer = rcgen::Issuer::new(sub, sub_key);
    let id = hufu_certs::Identity::new(gd.province, Role::Admin, "mallory").unwrap();
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![SanType::URI(id.uri().try_into().unwrap())];
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let leaf_cert = leaf.signed_by(&leaf_key, &sub_issuer).unwrap();
    hufu_node::client::ClientCert {
        cert_pem: format!("{}{}", leaf_cert.pem(), sub_cert.pem()),
        key_pem: leaf_key.serialize_pem(),
    }
}

#[tokio::test]
async fn a_caller_certified_by_a_sub_ca_is_refused_at_the_handshake() {
    let mut running = common::start("440000").await;
    let gd = &running.province;
    let rogue = admin_through_a_sub_ca(gd);
    // The chain is otherwise sound: webpki alone, which keeps only an
    // anchor's name and key, accepts it. Only the CA's pathlen:0 refuses it.
    {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, UnixTime};
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(rogue.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(gd.ca_pem().unwrap().as_bytes()).unwrap())
            .unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .unwrap()
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .expect("webpki alone accepts the sub-ca's chain");
    }
    let refused = match gd.channel_as(&rogue).await {
        Err(err) => format!("{err:#}"),
        // TLS 1.3: the client may finish before the node's refusal arrives.
        Ok(channel) => hufu_proto::v1::admin_service_client::AdminServiceClient::new(channel)
            .rotate_key(hufu_proto::v1::RotateKeyRequest::default())
            .await
            .expect_err("an admin certified by a sub-ca rotated the province's key")
            .to_string(),
    };
    assert!(!refused.is_empty());
    // The province's own admin, certified by the CA itself, is served.
    gd.admin()
        .await
        .unwrap()
        .rotate_key(hufu_proto::v1::RotateKeyRequest::default())
        .await
        .unwrap();
    running.province.stop().await.unwrap();
}

/// Signs `header` and `claims` (JSON values) with the node's active ES256
/// code-signing key, read from its key directory as an issuer could.
fn sign_with_node_key(
    gd: &LocalProvince,
    kid: &str,
    header: &serde_json::Value,
    claims: &serde_json::Value,
) -> String {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    use data_encoding::BASE64URL_NOPAD as B64;
    use rustls::pki_types::pem::PemObject;
    let path = gd
        .config
        .path(&gd.config.codes.keys_dir)
        .join(format!("{kid}.pem"));
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_file(&path).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der.secret_pkcs8_der()).unwrap();
    let message = format!(
        "{}.{}",
        B64.encode(header.to_string().as_bytes()),
        B64.encode(claims.to_string().as_bytes())
    );
    let signature = pair
        .sign(&aws_lc_rs::rand::SystemRandom::new(), message.as_bytes())
        .unwrap();
    format!("{message}.{}", B64.encode(signature.as_ref()))
}

#[tokio::test]
async fn codes_with_crit_or_issued_in_the_future_are_refused() {
    use hufu_proto::v1::Verdict;
    let mut running = common::start("440000").await;
    let gd = &running.province;
    common::import_samples(gd, 1).await;
    let issued = common::issue_code(gd, 0).await;
    let parts: Vec<&str> = issued.token.split('.').collect();
    let decode = |part: &str| -> serde_json::Value {
        serde_json::from_slice(
            &data_encoding::BASE64URL_NOPAD
                .decode(part.as_bytes())
                .unwrap(),
        )
        .unwrap()
    };
    let (header, claims) = (decode(parts[0]), decode(parts[1]));
    let verdict = |token: String| async move {
        let reply = common::verify(gd, &token).await;
        (reply.verdict(), reply.reason)
    };
    // Re-signed unchanged, the code verifies: only what is changed below
    // is refused.
    let resigned = sign_with_node_key(gd, &issued.kid, &header, &claims);
    assert_eq!(verdict(resigned).await.0, Verdict::Valid);

    for crit in [
        serde_json::Value::Null,
        serde_json::json!([]),
        serde_json::json!(["exp"]),
    ] {
        let mut with_crit = header.clone();
        with_crit["crit"] = crit.clone();
        let (v, reason) = verdict(sign_with_node_key(gd, &issued.kid, &with_crit, &claims)).await;
        assert_eq!(v, Verdict::Malformed, "crit {crit}: {reason}");
    }
    // An issuer whose clock runs a day ahead, nbf left at the real time.
    let mut future = claims.clone();
    future["iat"] = (future["iat"].as_i64().unwrap() + 86_400).into();
    let (v, reason) = verdict(sign_with_node_key(gd, &issued.kid, &header, &future)).await;
    assert_eq!(v, Verdict::NotYetValid, "{reason}");
    running.province.stop().await.unwrap();
}
