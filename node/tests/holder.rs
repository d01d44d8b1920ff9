//! Binding a code to the person who shows it: masked name and id in the
//! code, and `holder_match` from a national id read at a checkpoint, for a
//! code of the node's own province and of another, with the issuer up and
//! down; and the national id and full name left nowhere on the way.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hufu_certs::Province;
use hufu_federation::audit::EntryKind;
use hufu_node::local::{LocalFederation, LocalProvince};
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use hufu_proto::v1::{HolderMatch, Verdict, VerifyRequest, VerifyResponse};
use tonic::Code;
use tonic::transport::Channel;

const GD: &str = "440000";
const SN: &str = "610000";

/// A holder with a compound surname, and how codes show the name.
const NAME: &str = "欧阳娜娜";
const MASKED_NAME: &str = "欧阳**";

fn p(code: &str) -> Province {
    common::province(code)
}

/// Every log line of every node in this test process, at debug level.
fn captured_logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .init();
        logs
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Guangdong issues, Shaanxi's checkpoints verify; short deadlines so a
/// province that is down is noticed quickly.
async fn federation(root: &Path) -> LocalFederation {
    captured_logs();
    let mut fed = LocalFederation::init(root, &[p(GD), p(SN)], |c| {
        c.federation.heartbeat_ms = 100;
        c.federation.peer_deadline_ms = 300;
        c.federation.gossip_secs = 1;
    })
    .unwrap();
    fed.start_all().await.unwrap();
    fed
}

fn national_id(province: Province, n: u64) -> String {
    hufu_node::sample::national_id(province, n)
        .as_str()
        .to_owned()
}

fn masked(id: &str) -> String {
    format!("{}**********{}", &id[..4], &id[14..])
}

/// A code for GD's sample holder 0, issued with `NAME`.
async fn issue(gd: &LocalProvince) -> String {
    common::import_samples(gd, 2).await;
    common::issue_code_named(gd, 0, NAME).await.token
}

async fn verify(
    terminal: &mut StatusLookupServiceClient<Channel>,
    token: &str,
    card: Option<&str>,
) -> VerifyResponse {
    terminal
        .verify(VerifyRequest {
            token: token.to_owned(),
            national_id: card.unwrap_or_default().to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

fn holder_match(reply: &VerifyResponse) -> HolderMatch {
    assert_eq!(reply.verdict, Verdict::Valid as i32, "{}", reply.reason);
    HolderMatch::try_from(reply.holder_match).unwrap()
}

/// A terminal of `at` once it verifies `token` (the trust list has reached
/// it with the issuer's keys).
async fn ready_terminal(at: &LocalProvince, token: &str) -> StatusLookupServiceClient<Channel> {
    let mut terminal = at.terminal("checkpoint").await.unwrap();
    let start = Instant::now();
    while verify(&mut terminal, token, None).await.verdict != Verdict::Valid as i32 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "code never verified at {}",
            at.province
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    terminal
}

/// The node's own audit entries, flushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_match_is_true_or_false_and_unknown_without_the_issuer() {
    let scratch = tempfile::tempdir().unwrap();
    let mut fed = federation(scratch.path()).await;
    let token = issue(fed.get(p(GD))).await;
    let holder = national_id(p(GD), 0);
    let someone_else = national_id(p(GD), 1);

    // At a checkpoint of the issuing province: the node recomputes the
    // pseudonym. The masked name and id come with every answer.
    let mut gd = ready_terminal(fed.get(p(GD)), &token).await;
    let reply = verify(&mut gd, &token, None).await;
    assert_eq!(holder_match(&reply), HolderMatch::Unspecified);
    assert_eq!(reply.masked_name, MASKED_NAME);
    assert_eq!(reply.masked_national_id, masked(&holder));
    assert_eq!(
        holder_match(&verify(&mut gd, &token, Some(&holder)).await),
        HolderMatch::True
    );
    let reply = verify(&mut gd, &token, Some(&someone_else)).await;
    assert_eq!(holder_match(&reply), HolderMatch::False);
    assert_eq!(reply.masked_name, MASKED_NAME);

    // At a checkpoint of another province: the issuer is asked.
    let mut sn = ready_terminal(fed.get(p(SN)), &token).await;
    let reply = verify(&mut sn, &token, Some(&holder)).await;
    assert_eq!(holder_match(&reply), HolderMatch::True);
    assert_eq!(reply.masked_name, MASKED_NAME);
    assert_eq!(reply.masked_national_id, masked(&holder));
    assert_eq!(
        holder_match(&verify(&mut sn, &token, Some(&someone_else)).await),
        HolderMatch::False
    );

    // A misread card is the terminal's error, said without echoing the id.
    let misread = format!("{}0", &holder[..17]);
    let misread = if misread == holder {
        format!("{}1", &holder[..17])
    } else {
        misread
    };
    let err = sn
        .verify(VerifyRequest {
            token: token.clone(),
            national_id: misread.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("read the identity card again"),
        "{err:?}"
    );
    assert!(!err.message().contains(&misread), "{err:?}");

    // The issuer goes down: the code still verifies (offline), the match is
    // unknown, for the holder's id as for another's, and never true.
    fed.get_mut(p(GD)).stop().await.unwrap();
    for card in [&holder, &someone_else, &holder, &holder] {
        let reply = verify(&mut sn, &token, Some(card)).await;
        assert_eq!(holder_match(&reply), HolderMatch::Unknown);
        assert_eq!(reply.masked_name, MASKED_NAME);
    }

    // Shaanxi's audit log has each match it asked for and its outcome,
    // under the pseudonym.
    let entries = common::audit_entries(fed.get(p(SN))).await;
    let answers = |kind: EntryKind| -> Vec<(Option<String>, Option<String>)> {
        entries
            .iter()
            .filter(|e| {
                e.kind == kind
                    && e.detail
                        .as_deref()
                        .is_some_and(|d| d.contains("holder match"))
            })
            .map(|e| (e.answer.clone(), e.detail.clone()))
            .collect()
    };
    let made: Vec<_> = answers(EntryKind::LookupMade)
        .into_iter()
        .map(|(a, _)| a.unwrap())
        .collect();
    assert_eq!(made[..2], ["match", "mismatch"]);
    assert!(made[2..].iter().all(|a| a == "unreachable"), "{made:?}");
    let served: Vec<_> = answers(EntryKind::VerifyServed)
        .into_iter()
        .map(|(_, d)| d.unwrap())
        .collect();
    assert_eq!(served[..2], ["holder match true", "holder match false"]);
    assert!(
        served[2..].iter().all(|d| d == "holder match unknown"),
        "{served:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_national_id_or_full_name_in_any_stored_byte_log_line_or_audit_entry() {
    let scratch = tempfile::tempdir().unwrap();
    let mut fed = federation(scratch.path()).await;
    let token = issue(fed.get(p(GD))).await;
    let holder = national_id(p(GD), 0);
    let someone_else = national_id(p(GD), 1);

    // Matches asked at both provinces, for the holder and for someone else,
    // then once more with the issuer down.
    let mut gd = ready_terminal(fed.get(p(GD)), &token).await;
    let mut sn = ready_terminal(fed.get(p(SN)), &token).await;
    for card in [&holder, &someone_else] {
        assert_ne!(
            holder_match(&verify(&mut gd, &token, Some(card)).await),
            HolderMatch::Unknown
        );
        assert_ne!(
            holder_match(&verify(&mut sn, &token, Some(card)).await),
            HolderMatch::Unknown
        );
    }
    let gd_entries = common::audit_entries(fed.get(p(GD))).await;
    fed.get_mut(p(GD)).stop().await.unwrap();
    assert_eq!(
        holder_match(&verify(&mut sn, &token, Some(&holder)).await),
        HolderMatch::Unknown
    );
    let sn_entries = common::audit_entries(fed.get(p(SN))).await;
    let sn_state = fed.get(p(SN)).node.as_ref().unwrap().state.clone();
    sn_state.store.flush().await.unwrap();

    // The issuer served the matches Shaanxi asked for: audited there too.
    assert_eq!(
        gd_entries
            .iter()
            .filter(|e| e.kind == EntryKind::LookupServed
                && e.detail.as_deref() == Some("holder match"))
            .count(),
        2
    );

    let secrets: [(&str, &[u8]); 4] = [
        ("holder's national id", holder.as_bytes()),
        ("other national id", someone_else.as_bytes()),
        ("full name", NAME.as_bytes()),
        ("given name", "娜娜".as_bytes()),
    ];
    // Not in any audit entry of either node.
    for entry in gd_entries.iter().chain(&sn_entries) {
        let bytes = entry.encode().unwrap();
        for (what, secret) in secrets {
            assert!(
                !common::contains(&bytes, secret),
                "{what} in audit entry {entry:?}"
            );
        }
    }
    // Not in any byte either node keeps: databases, audit logs, keys, config.
    let searched: Vec<PathBuf> = [GD, SN]
        .iter()
        .flat_map(|c| common::files(&fed.get(p(c)).dir))
        .collect();
    let mut pseudonym_seen = false;
    let pseudonym = common::pseudonym(fed.get(p(GD)), 0);
    let pseudonym_bytes = hufu_node::store::codec::holder_bytes(&pseudonym).unwrap();
    for file in &searched {
        let bytes = std::fs::read(file).unwrap();
        for (what, secret) in secrets {
            assert!(
                !common::contains(&bytes, secret),
                "{what} found in {}",
                file.display()
            );
        }
        pseudonym_seen |= common::contains(&bytes, &pseudonym_bytes);
    }
    // The search does look at the data: the holder's status is there, keyed
    // by the pseudonym's 16 bytes. (The audit logs keep their entries
    // compressed: those are searched decoded, above.)
    assert!(pseudonym_seen, "searched {searched:?}");

    // Not in any log line, at debug level.
    let logs = captured_logs().lock().unwrap().clone();
    for (what, secret) in secrets {
        assert!(!common::contains(&logs, secret), "{what} in the logs");
    }
    // The capture does see the nodes' logs: the unreachable issuer is there.
    assert!(
        common::contains(&logs, b"holder match unknown"),
        "{}",
        String::from_utf8_lossy(&logs[logs.len().saturating_sub(2000)..])
    );
}

/// Python's grpcio, with stubs generated from the repository's protos at
/// test time, verifies a code over mutual TLS and reads the masked fields
/// and the holder match.
#[tokio::test]
async fn a_grpcio_client_sees_the_masked_name_and_id() {
    const SCRIPT: &str = r#"
token, card = args
reply = status_pb2_grpc.StatusLookupServiceStub(channel).Verify(
    status_pb2.VerifyRequest(token=token, national_id=card), timeout=10)
print(json.dumps({
    "verdict": status_pb2.Verdict.Name(reply.verdict),
    "masked_name": reply.masked_name,
    "masked_national_id": reply.masked_national_id,
    "holder_match": status_pb2.HolderMatch.Name(reply.holder_match),
}, ensure_ascii=False))
"#;
    captured_logs();
    let node = common::start(GD).await;
    let gd = &node.province;
    let token = issue(gd).await;
    let holder = national_id(gd.province, 0);
    let seen = common::grpcio(gd, node.scratch.path(), SCRIPT, &[&token, &holder]).await;
    assert_eq!(seen["verdict"], "VERDICT_VALID");
    assert_eq!(seen["masked_name"], MASKED_NAME);
    assert_eq!(seen["masked_national_id"], masked(&holder));
    assert_eq!(seen["holder_match"], "HOLDER_MATCH_TRUE");
}
