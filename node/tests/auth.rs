//! Who may connect and what they may call: every refusal made the right way
//! (TLS handshake or PERMISSION_DENIED), and the node keeps serving.

mod common;

use hufu_certs::{CertificateAuthority, Identity, LeafOptions, Role};
use hufu_node::client::ClientCert;
use hufu_node::local::LocalProvince;
use hufu_proto::v1::admin_service_client::AdminServiceClient;
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use hufu_proto::v1::{GetStatusRequest, LookupRequest, get_status_request};
use tonic::Code;

struct Setup {
    _scratch: tempfile::TempDir,
    gd: LocalProvince,
    sn: LocalProvince,
    holder: String,
}

/// Guangdong serving, with Shaanxi as a member whose CA it trusts; Shaanxi's
/// node is not started (its CA is what matters here).
async fn setup() -> Setup {
    let scratch = tempfile::tempdir().unwrap();
    let mut gd = LocalProvince::init(scratch.path(), common::province("440000")).unwrap();
    let sn = LocalProvince::init(scratch.path(), common::province("610000")).unwrap();
    gd.config
        .member_cas
        .push(sn.config.path(&sn.config.ca_cert));
    gd.start().await.unwrap();
    let holder = common::import_samples(&gd, 1).await.remove(0);
    Setup {
        _scratch: scratch,
        gd,
        sn,
        holder,
    }
}

fn lookup_request(holder: &str) -> LookupRequest {
    LookupRequest {
        issuer: "440000".into(),
        holder: holder.into(),
    }
}

fn handshake_failures(p: &LocalProvince) -> u64 {
    p.node
        .as_ref()
        .unwrap()
        .state
        .metrics
        .handshake_failures
        .get()
}

/// Asserts that `cert` cannot get a call through: the TLS handshake fails
/// (at connect or at the first call), the node counts the refusal, and a
/// good terminal is still served afterwards.
async fn assert_refused_at_handshake(s: &Setup, cert: &ClientCert, what: &str) {
    let before = handshake_failures(&s.gd);
    match s.gd.channel_as(cert).await {
        Err(_) => {}
        Ok(channel) => {
            let err = StatusLookupServiceClient::new(channel)
                .lookup(lookup_request(&s.holder))
                .await
                .expect_err(what);
            // A transport failure, never an answer from a service.
            assert!(
                matches!(err.code(), Code::Unavailable | Code::Unknown),
                "{what}: {err:?}"
            );
            assert!(format!("{err:?}").contains("alert"), "{what}: {err:?}");
        }
    }
    // The server may log the failure a moment after the client gives up.
    for _ in 0..50 {
        if handshake_failures(&s.gd) > before {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        handshake_failures(&s.gd) > before,
        "{what}: node did not count a refused handshake"
    );
    let mut good = s.gd.terminal("gate-ok").await.unwrap();
    good.lookup(lookup_request(&s.holder))
        .await
        .expect("node keeps serving");
}

fn cert_of(issued: hufu_certs::IssuedCert) -> ClientCert {
    ClientCert {
        cert_pem: issued.cert_pem,
        key_pem: issued.key_pem,
    }
}

#[tokio::test]
async fn refusals_at_the_handshake() {
    let s = setup().await;
    let gd = common::province("440000");
    let sn = common::province("610000");
    let terminal = Identity::new(gd, Role::Terminal, "gate-1").unwrap();

    // A CA nobody trusts, even one claiming the right province.
    let rogue = CertificateAuthority::generate(gd).unwrap();
    let cert = cert_of(rogue.issue(&terminal, &LeafOptions::default()).unwrap());
    assert_refused_at_handshake(&s, &cert, "certificate from an unknown CA").await;

    // A CA of a province that is not a member.
    let tianjin = CertificateAuthority::generate(common::province("120000")).unwrap();
    let tj_terminal = Identity::new(tianjin.province(), Role::Terminal, "t").unwrap();
    let cert = cert_of(
        tianjin
            .issue(&tj_terminal, &LeafOptions::default())
            .unwrap(),
    );
    assert_refused_at_handshake(&s, &cert, "certificate of a non-member province").await;

    // Self-signed, with a well-formed identity.
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(terminal.uri().try_into().unwrap())];
    let key = rcgen::KeyPair::generate().unwrap();
    let self_signed = params.self_signed(&key).unwrap();
    let cert = ClientCert {
        cert_pem: self_signed.pem(),
        key_pem: key.serialize_pem(),
    };
    assert_refused_at_handshake(&s, &cert, "self-signed certificate").await;

    // Expired, from the right CA.
    let now = time::OffsetDateTime::now_utc();
    let expired = LeafOptions {
        not_before: now - time::Duration::days(30),
        not_after: now - time::Duration::days(1),
        ..LeafOptions::default()
    };
    let cert =
        s.gd.client_cert_with(Role::Terminal, "gate-old", &expired)
            .unwrap();
    assert_refused_at_handshake(&s, &cert, "expired certificate").await;

    // Not yet valid.
    let future = LeafOptions {
        not_before: now + time::Duration::days(1),
        not_after: now + time::Duration::days(30),
        ..LeafOptions::default()
    };
    let cert =
        s.gd.client_cert_with(Role::Terminal, "gate-new", &future)
            .unwrap();
    assert_refused_at_handshake(&s, &cert, "not-yet-valid certificate").await;

    // Guangdong's CA minting a Shaanxi identity, and Shaanxi's CA minting a
    // Guangdong admin: a CA vouches only for its own province.
    let gd_ca = hufu_node::init::load_ca(&s.gd.dir).unwrap();
    let sn_node = Identity::new(sn, Role::Node, "impostor").unwrap();
    let cert = cert_of(
        gd_ca
            .issue_unchecked(&sn_node, &LeafOptions::default())
            .unwrap(),
    );
    assert_refused_at_handshake(&s, &cert, "440000 CA minting a 610000 node").await;
    let sn_ca = hufu_node::init::load_ca(&s.sn.dir).unwrap();
    let gd_admin = Identity::new(gd, Role::Admin, "admin").unwrap();
    let cert = cert_of(
        sn_ca
            .issue_unchecked(&gd_admin, &LeafOptions::default())
            .unwrap(),
    );
    assert_refused_at_handshake(&s, &cert, "610000 CA minting a 440000 admin").await;
}

#[tokio::test]
async fn permissions_follow_the_certificate_identity() {
    let s = setup().await;

    // A terminal of another (member) province connects, but may not look up
    // here: its own province's node answers it.
    let mut foreign =
        StatusLookupServiceClient::new(s.sn.channel_to(&s.gd, Role::Terminal, "gate-sn").await);
    let err = foreign.lookup(lookup_request(&s.holder)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // It names both provinces: the caller's and the node's.
    assert!(
        err.message()
            .contains("a terminal of province 610000 (Shaanxi) may only call its own province's nodes, and this node serves 440000 (Guangdong)"),
        "{}",
        err.message()
    );

    // A node of another member province may look up.
    let mut peer =
        StatusLookupServiceClient::new(s.sn.channel_to(&s.gd, Role::Node, "node-1").await);
    let reply = peer
        .lookup(lookup_request(&s.holder))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.record.unwrap().holder, s.holder);

    // Terminals may not administer; admins of another province neither;
    // admins may not look up as terminals do.
    let admin_call = |channel| async move {
        AdminServiceClient::new(channel)
            .get_status(GetStatusRequest {
                subject: Some(get_status_request::Subject::Holder(
                    String::from("A").repeat(26),
                )),
            })
            .await
            .unwrap_err()
    };
    let err = admin_call(s.gd.channel(Role::Terminal, "gate-1").await.unwrap()).await;
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("only admin certificates"),
        "{}",
        err.message()
    );
    let err = admin_call(s.sn.channel_to(&s.gd, Role::Admin, "admin").await).await;
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = admin_call(s.gd.channel(Role::Auditor, "aud").await.unwrap()).await;
    assert_eq!(err.code(), Code::PermissionDenied);

    let err = StatusLookupServiceClient::new(s.gd.channel(Role::Admin, "admin2").await.unwrap())
        .lookup(lookup_request(&s.holder))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // The province's admin is allowed.
    let mut admin = s.gd.admin().await.unwrap();
    let reply = admin
        .get_status(GetStatusRequest {
            subject: Some(get_status_request::Subject::Holder(s.holder.clone())),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.record.unwrap().holder, s.holder);
}

/// Connecting with a certificate of one province to another province's node.
trait ChannelTo {
    async fn channel_to(
        &self,
        node: &LocalProvince,
        role: Role,
        name: &str,
    ) -> tonic::transport::Channel;
}

impl ChannelTo for LocalProvince {
    async fn channel_to(
        &self,
        node: &LocalProvince,
        role: Role,
        name: &str,
    ) -> tonic::transport::Channel {
        let cert = self.client_cert(role, name).unwrap();
        hufu_node::client::connect(&node.target().unwrap(), &cert)
            .await
            .unwrap()
    }
}
