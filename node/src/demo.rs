//! `hufu demo`: provinces on loopback with real certificates, storage and
//! mutual TLS, telling the story of a code's life in a table.

use std::time::{Duration, Instant};

use hufu_certs::Province;
use hufu_proto::v1::{
    Colour, ImportRow, LookupRequest, PutStatusRequest, Source, StatusInput, Verdict,
    VerifyRequest, issue_code_request, status_input,
};

use crate::local::LocalProvince;
use crate::sample;
use crate::status::{colour_name, now_unix, timestamp};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Province to run.
    #[arg(long, default_value = "440000")]
    pub province: Province,
    /// Sample holders to load.
    #[arg(long, default_value_t = 1000)]
    pub holders: u64,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration: Option<u64>,
}

fn colour(c: i32) -> &'static str {
    colour_name(Colour::try_from(c).unwrap_or(Colour::Unspecified))
}

fn source(s: i32) -> String {
    Source::try_from(s)
        .unwrap_or_default()
        .as_str_name()
        .trim_start_matches("SOURCE_")
        .to_lowercase()
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let p = args.province;
    println!(
        "Hufu demo: province {p} ({}) on loopback, data in {}",
        p.name(),
        scratch.path().display()
    );
    let mut province = LocalProvince::init(scratch.path(), p)?;
    let addr = province.start().await?;
    println!("node serving gRPC over mutual TLS on {addr}\n");

    // Load sample holders: every fifth yellow, every fiftieth red.
    let now = now_unix();
    let rows: Vec<ImportRow> = (0..args.holders)
        .map(|n| ImportRow {
            line: n + 1,
            status: Some(StatusInput {
                subject: Some(status_input::Subject::NationalId(
                    sample::national_id(p, n).as_str().to_owned(),
                )),
                colour: match n {
                    n if n % 50 == 7 => Colour::Red,
                    n if n % 5 == 3 => Colour::Yellow,
                    _ => Colour::Green,
                } as i32,
                as_of: Some(timestamp(now - 3600)),
                last_negative_test: Some(timestamp(now - 20 * 3600 - (n as i64 % 60) * 3600)),
                reason: 0,
            }),
        })
        .collect();
    let mut admin = province.admin().await?;
    let started = Instant::now();
    let summary = admin
        .import_statuses(tokio_stream::iter(rows))
        .await?
        .into_inner();
    println!(
        "imported {} holders in {:.0?} ({} rejected); national ids were pseudonymised at the node",
        summary.accepted,
        started.elapsed(),
        summary.rejected.len()
    );

    // Codes for a few holders, verified by a checkpoint terminal.
    let mut terminal = province.terminal("checkpoint-1").await?;
    println!(
        "\n{:<28} {:<8} {:<8} {:<15} {:>9}",
        "holder", "lookup", "code", "source", "latency"
    );
    let mut tokens = Vec::new();
    for n in [0u64, 3, 7, 11] {
        let id = sample::national_id(p, n % args.holders.max(1));
        let code = admin
            .issue_code(hufu_proto::v1::IssueCodeRequest {
                subject: Some(issue_code_request::Subject::NationalId(
                    id.as_str().to_owned(),
                )),
            })
            .await?
            .into_inner();
        let record = code.status.clone().unwrap_or_default();
        let t = Instant::now();
        let looked = terminal
            .lookup(LookupRequest {
                issuer: p.to_string(),
                holder: record.holder.clone(),
            })
            .await?
            .into_inner();
        let verified = terminal
            .verify(VerifyRequest {
                token: code.token.clone(),
                policy: None,
            })
            .await?
            .into_inner();
        println!(
            "{:<28} {:<8} {:<8} {:<15} {:>7.1}ms",
            record.holder,
            colour(looked.record.map(|r| r.colour).unwrap_or(0)),
            colour(verified.status.as_ref().map(|s| s.colour).unwrap_or(0)),
            source(verified.provenance.as_ref().map(|p| p.source).unwrap_or(0)),
            t.elapsed().as_secs_f64() * 1000.0
        );
        tokens.push((id, code));
    }
    if let Some((id, code)) = tokens.first() {
        println!(
            "\ncode for holder {}: {} bytes, QR version {}",
            code.status
                .as_ref()
                .map(|s| s.holder.as_str())
                .unwrap_or(""),
            code.token.len(),
            crate::qr::version(&crate::qr::symbol(&code.token)?)
        );
        // The holder becomes a close contact after the code was issued: the
        // still-valid code now verifies as the newer colour.
        admin
            .put_status(PutStatusRequest {
                status: Some(StatusInput {
                    subject: Some(status_input::Subject::NationalId(id.as_str().to_owned())),
                    colour: Colour::Red as i32,
                    as_of: None,
                    last_negative_test: None,
                    reason: hufu_proto::v1::Reason::CloseContact as i32,
                }),
            })
            .await?;
        let again = terminal
            .verify(VerifyRequest {
                token: code.token.clone(),
                policy: None,
            })
            .await?
            .into_inner();
        println!(
            "after a downgrade to red, the same code verifies as: {} ({})",
            colour(again.status.map(|s| s.colour).unwrap_or(0)),
            again.reason
        );
        let tampered = format!("{}x", code.token);
        let bad = terminal
            .verify(VerifyRequest {
                token: tampered,
                policy: None,
            })
            .await?
            .into_inner();
        println!(
            "a tampered code: {} ({})",
            Verdict::try_from(bad.verdict)
                .unwrap_or_default()
                .as_str_name(),
            bad.reason
        );
    }

    let deadline = args
        .duration
        .map(|s| Instant::now() + Duration::from_secs(s));
    println!(
        "\nnode running on {addr}; Ctrl-C to stop{}",
        match args.duration {
            Some(s) => format!(" (or {s}s)"),
            None => String::new(),
        }
    );
    match deadline {
        Some(d) => {
            tokio::select! {
                _ = tokio::time::sleep_until(d.into()) => {}
                _ = crate::cli::shutdown_signal() => {}
            }
        }
        None => crate::cli::shutdown_signal().await,
    }
    province.stop().await?;
    println!("stopped");
    Ok(())
}
