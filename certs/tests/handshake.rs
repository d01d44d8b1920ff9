//! Real mutual-TLS handshakes over loopback TCP, with certificates made by
//! `hufu-certs`: who gets in, who is refused, and why.

use std::sync::Arc;
use std::time::Duration;

use hufu_certs::{
    CertError, CertificateAuthority, Identity, IssuedCert, LeafOptions, Province, Role,
    TrustAnchors, client_config, peer_identity, server_config,
};
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, SanType};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn province(code: &str) -> Province {
    Province::parse(code).unwrap()
}

fn issue(ca: &CertificateAuthority, role: Role, name: &str) -> IssuedCert {
    let id = Identity::new(ca.province(), role, name).unwrap();
    let opts = match role {
        Role::Node => LeafOptions::for_node(&[]),
        _ => LeafOptions::default(),
    };
    ca.issue(&id, &opts).unwrap()
}

/// Two member provinces, Guangdong and Shaanxi, each with a CA and a node.
struct Federation {
    gd: CertificateAuthority,
    sn: CertificateAuthority,
    anchors: Arc<TrustAnchors>,
    gd_node: IssuedCert,
    sn_node: IssuedCert,
}

impl Federation {
    fn new() -> Self {
        let gd = CertificateAuthority::generate(province("440000")).unwrap();
        let sn = CertificateAuthority::generate(province("610000")).unwrap();
        let anchors = TrustAnchors::new([gd.cert_der(), sn.cert_der()]).unwrap();
        let gd_node = issue(&gd, Role::Node, "gd-1");
        let sn_node = issue(&sn, Role::Node, "sn-1");
        Federation {
            gd,
            sn,
            anchors,
            gd_node,
            sn_node,
        }
    }

    fn gd_server(&self) -> Arc<ServerConfig> {
        server_config(
            self.anchors.clone(),
            &self.gd_node.cert_pem,
            &self.gd_node.key_pem,
        )
        .unwrap()
    }

    /// A client holding `cert` that expects to reach a node of `expected`.
    fn client(&self, expected: &str, cert: &IssuedCert) -> Arc<ClientConfig> {
        client_config(
            self.anchors.clone(),
            province(expected),
            &cert.cert_pem,
            &cert.key_pem,
        )
        .unwrap()
    }
}

/// What each side saw: the verified peer's identity, or the error.
struct Outcome {
    server: Result<Identity, String>,
    client: Result<Identity, String>,
}

/// One handshake over loopback; the server sends a byte once it has
/// accepted the client, so a client refused after its own handshake
/// finished (TLS 1.3) sees the server's alert when it reads.
async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    server_name: &str,
) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server);
    let server_side = async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let identity = peer_identity(tls.get_ref().1.peer_certificates().unwrap_or_default())
            .map_err(|e| e.to_string())?;
        tls.write_all(b"!").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok(identity)
    };
    let connector = TlsConnector::from(client);
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    let client_side = async move {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        peer_identity(tls.get_ref().1.peer_certificates().unwrap_or_default())
            .map_err(|e| e.to_string())
    };
    let both = async { tokio::join!(server_side, client_side) };
    let (server, client) = tokio::time::timeout(Duration::from_secs(5), both)
        .await
        .expect("handshake hung");
    Outcome { server, client }
}

fn assert_refused_by_server(outcome: &Outcome, needle: &str) {
    let err = outcome
        .server
        .as_ref()
        .expect_err("server accepted the client");
    assert!(
        err.contains(needle),
        "server error {err:?} lacks {needle:?}"
    );
    assert!(outcome.client.is_err(), "client did not notice the refusal");
}

#[tokio::test]
async fn terminal_and_node_of_one_province_meet() {
    let fed = Federation::new();
    let terminal = issue(&fed.gd, Role::Terminal, "checkpoint-7");
    let outcome = handshake(
        fed.gd_server(),
        fed.client("440000", &terminal),
        "localhost",
    )
    .await;
    let seen_by_server = outcome.server.unwrap();
    assert_eq!(
        seen_by_server.uri(),
        "spiffe://hufu/province/440000/terminal/checkpoint-7"
    );
    let seen_by_client = outcome.client.unwrap();
    assert_eq!(
        seen_by_client.uri(),
        "spiffe://hufu/province/440000/node/gd-1"
    );
}

#[tokio::test]
async fn node_of_another_member_is_accepted_over_ip() {
    let fed = Federation::new();
    let outcome = handshake(
        fed.gd_server(),
        fed.client("440000", &fed.sn_node),
        "127.0.0.1",
    )
    .await;
    let peer = outcome.server.unwrap();
    assert_eq!((peer.province, peer.role), (province("610000"), Role::Node));
    assert_eq!(outcome.client.unwrap().province, province("440000"));
}

#[tokio::test]
async fn client_from_an_unknown_ca_is_refused() {
    let fed = Federation::new();
    // Same province, same name, but a CA nobody trusts.
    let rogue_ca = CertificateAuthority::generate(province("440000")).unwrap();
    let rogue = issue(&rogue_ca, Role::Terminal, "checkpoint-7");
    let outcome = handshake(fed.gd_server(), fed.client("440000", &rogue), "localhost").await;
    assert_refused_by_server(&outcome, "invalid peer certificate");
}

#[tokio::test]
async fn client_of_an_untrusted_province_is_refused() {
    let fed = Federation::new();
    let bj_ca = CertificateAuthority::generate(province("110000")).unwrap();
    let bj = issue(&bj_ca, Role::Node, "bj-1");
    let outcome = handshake(fed.gd_server(), fed.client("440000", &bj), "localhost").await;
    assert_refused_by_server(&outcome, "no trust anchor for province 110000");
}

#[tokio::test]
async fn self_signed_client_is_refused() {
    let fed = Federation::new();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        "spiffe://hufu/province/440000/admin/mallory"
            .try_into()
            .unwrap(),
    )];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.self_signed(&key).unwrap();
    let mallory = IssuedCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    };
    let outcome = handshake(fed.gd_server(), fed.client("440000", &mallory), "localhost").await;
    assert_refused_by_server(&outcome, "invalid peer certificate");
}

#[tokio::test]
async fn expired_client_is_refused() {
    let fed = Federation::new();
    let id = Identity::new(province("440000"), Role::Terminal, "old").unwrap();
    let now = time::OffsetDateTime::now_utc();
    let opts = LeafOptions {
        not_before: now - time::Duration::days(30),
        not_after: now - time::Duration::days(1),
        ..LeafOptions::default()
    };
    let expired = fed.gd.issue(&id, &opts).unwrap();
    let outcome = handshake(fed.gd_server(), fed.client("440000", &expired), "localhost").await;
    assert_refused_by_server(&outcome, "certificate expired");
}

#[tokio::test]
async fn a_ca_cannot_mint_identities_of_another_province() {
    let fed = Federation::new();
    // Guangdong's CA signs a Shaanxi node identity. Both CAs are trusted,
    // but the certificate names Shaanxi, so only Shaanxi's CA may vouch.
    let forged_id = Identity::new(province("610000"), Role::Node, "sn-1").unwrap();
    let forged = fed
        .gd
        .issue_unchecked(&forged_id, &LeafOptions::for_node(&[]))
        .unwrap();
    let outcome = handshake(fed.gd_server(), fed.client("440000", &forged), "localhost").await;
    assert_refused_by_server(&outcome, "invalid peer certificate");

    // The same forgery as a server: a client expecting Shaanxi refuses it.
    let forged_server =
        server_config(fed.anchors.clone(), &forged.cert_pem, &forged.key_pem).unwrap();
    let outcome = handshake(
        forged_server,
        fed.client("610000", &fed.gd_node),
        "localhost",
    )
    .await;
    let err = outcome.client.expect_err("client accepted a forged server");
    assert!(err.contains("invalid peer certificate"), "{err}");
}

#[tokio::test]
async fn client_refuses_a_node_of_another_province() {
    let fed = Federation::new();
    let sn_server = server_config(
        fed.anchors.clone(),
        &fed.sn_node.cert_pem,
        &fed.sn_node.key_pem,
    )
    .unwrap();
    let outcome = handshake(sn_server, fed.client("440000", &fed.gd_node), "localhost").await;
    let err = outcome
        .client
        .expect_err("client accepted the wrong province");
    assert!(
        err.contains("spiffe://hufu/province/610000/node/sn-1")
            && err.contains("a node of province 440000 was expected"),
        "{err}"
    );
    assert!(outcome.server.is_err());
}

#[tokio::test]
async fn client_checks_the_host_name() {
    let fed = Federation::new();
    let outcome = handshake(
        fed.gd_server(),
        fed.client("440000", &fed.sn_node),
        "gd.example.org",
    )
    .await;
    let err = outcome
        .client
        .expect_err("client accepted a wrong host name");
    assert!(
        err.contains("not valid for name \"gd.example.org\""),
        "{err}"
    );
}

#[tokio::test]
async fn replaced_anchors_apply_to_new_handshakes() {
    let fed = Federation::new();
    let server = fed.gd_server();
    let sn_client = fed.client("440000", &fed.sn_node);
    assert!(
        handshake(server.clone(), sn_client.clone(), "localhost")
            .await
            .server
            .is_ok()
    );

    // Shaanxi leaves the federation.
    fed.anchors.replace([fed.gd.cert_der()]).unwrap();
    let outcome = handshake(server.clone(), sn_client.clone(), "localhost").await;
    assert_refused_by_server(&outcome, "no trust anchor for province 610000");

    // And comes back.
    fed.anchors
        .replace([fed.gd.cert_der(), fed.sn.cert_der()])
        .unwrap();
    assert!(
        handshake(server, sn_client, "localhost")
            .await
            .server
            .is_ok()
    );
}

#[test]
fn only_node_certificates_can_serve() {
    let fed = Federation::new();
    let admin = issue(&fed.gd, Role::Admin, "ops");
    let err = server_config(fed.anchors.clone(), &admin.cert_pem, &admin.key_pem).unwrap_err();
    assert!(matches!(err, CertError::NotANode(Role::Admin)), "{err}");
}

#[test]
fn bad_pem_is_reported() {
    let fed = Federation::new();
    let err = server_config(fed.anchors.clone(), "", &fed.gd_node.key_pem).unwrap_err();
    assert!(matches!(err, CertError::MissingPem { .. }), "{err}");
    let err = server_config(fed.anchors.clone(), &fed.gd_node.cert_pem, "").unwrap_err();
    assert!(err.to_string().contains("PRIVATE KEY"), "{err}");
    // A key that is not the certificate's.
    let err = server_config(
        fed.anchors.clone(),
        &fed.gd_node.cert_pem,
        &fed.sn_node.key_pem,
    )
    .unwrap_err();
    assert!(matches!(err, CertError::Tls(_)), "{err}");
}

/// A sub-CA signed by `ca` (which says pathlen:0) and a leaf for `role`/`name`
/// of `ca`'s province signed by that sub-CA, as a chain PEM (leaf first).
fn through_a_sub_ca(ca: &CertificateAuthority, role: Role, name: &str) -> IssuedCert {
    let ca_key = KeyPair::from_pem(&ca.key_pem()).unwrap();
    let ca_issuer = rcgen::Issuer::from_ca_cert_der(&ca.cert_der(), ca_key).unwrap();

    let sub_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut sub = CertificateParams::default();
    sub.distinguished_name
        .push(rcgen::DnType::CommonName, "rogue sub-ca");
    sub.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    sub.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    sub.subject_alt_names = vec![SanType::URI(
        hufu_certs::ca_uri(ca.province()).try_into().unwrap(),
    )];
    let sub_cert = sub.signed_by(&sub_key, &ca_issuer).unwrap();
    let sub_issuer = rcgen::Issuer::new(sub, sub_key);

    let id = Identity::new(ca.province(), role, name).unwrap();
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![SanType::URI(id.uri().try_into().unwrap())];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    if role == Role::Node {
        leaf.subject_alt_names
            .push(SanType::DnsName("localhost".try_into().unwrap()));
    }
    let leaf_cert = leaf.signed_by(&leaf_key, &sub_issuer).unwrap();
    IssuedCert {
        cert_pem: format!("{}{}", leaf_cert.pem(), sub_cert.pem()),
        key_pem: leaf_key.serialize_pem(),
    }
}

#[tokio::test]
async fn a_sub_ca_under_a_pathlen_0_province_ca_is_refused() {
    let fed = Federation::new();
    // The chain is otherwise sound: webpki alone (which keeps only an
    // anchor's name and key) accepts it.
    let chained = through_a_sub_ca(&fed.gd, Role::Admin, "mallory");
    let outcome = handshake(fed.gd_server(), fed.client("440000", &chained), "localhost").await;
    assert_refused_by_server(&outcome, "pathlen:0");

    // A node certificate from a sub-CA cannot serve to a client either.
    let rogue_node = through_a_sub_ca(&fed.gd, Role::Node, "gd-rogue");
    let rogue_server = server_config(
        fed.anchors.clone(),
        &rogue_node.cert_pem,
        &rogue_node.key_pem,
    )
    .unwrap();
    let outcome = handshake(
        rogue_server,
        fed.client("440000", &fed.sn_node),
        "localhost",
    )
    .await;
    let err = outcome.client.expect_err("client accepted a sub-ca's node");
    assert!(err.contains("pathlen:0"), "{err}");

    // Leaves straight from the province CA still pass.
    let direct = issue(&fed.gd, Role::Admin, "admin");
    let outcome = handshake(fed.gd_server(), fed.client("440000", &direct), "localhost").await;
    assert!(outcome.server.is_ok(), "{:?}", outcome.server);
}
