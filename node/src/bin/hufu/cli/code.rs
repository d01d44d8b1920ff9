//! `hufu code` and `hufu verify`: issue a signed code (also as a QR code),
//! print the published keys, and verify a code the way a checkpoint does.

use std::path::PathBuf;
use std::process::ExitCode;

use hufu_proto::v1::admin_service_client::AdminServiceClient;
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use hufu_proto::v1::{
    GetJwksRequest, HolderMatch, IssueCodeRequest, Policy, Verdict, VerifyRequest,
    issue_code_request, status_input,
};

use super::conn::ConnArgs;
use super::status::{HolderArgs, input, print_record};
use crate::output::outln;
use hufu_node::status::{format_time, parse_colour};

#[derive(Debug, clap::Subcommand)]
pub enum CodeCommand {
    /// Issue a signed code for a holder with their current status.
    Issue {
        #[command(flatten)]
        who: HolderArgs,
        /// The holder's name as on the identity card; the code carries it
        /// masked (张*三), for checkpoints to compare with the person.
        #[arg(long)]
        name: Option<String>,
        /// Also write the code as a QR image (.png or .svg).
        #[arg(long)]
        qr: Option<PathBuf>,
        /// Also print the code as a QR code in the terminal.
        #[arg(long)]
        qr_terminal: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Print the node's published code-signing keys (JWKS).
    Jwks {
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The code (compact JWT, the QR text "HUFU:/…", or a member's legacy
    /// code as scanned); "-" reads it from stdin.
    pub token: String,
    /// National id read from the identity card of the person showing the
    /// code: the node answers whether it is the holder's.
    #[arg(long = "id")]
    pub national_id: Option<String>,
    /// Require a negative test within this many hours.
    #[arg(long)]
    pub negative_test_within_hours: Option<i64>,
    /// Require at most this colour (green or yellow).
    #[arg(long)]
    pub max_colour: Option<String>,
    /// Refuse answers from a stale replica.
    #[arg(long)]
    pub require_fresh: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

pub async fn code(cmd: CodeCommand) -> anyhow::Result<()> {
    match cmd {
        CodeCommand::Issue {
            who,
            name,
            qr,
            qr_terminal,
            conn,
        } => {
            let subject = match input(&who) {
                status_input::Subject::NationalId(id) => {
                    issue_code_request::Subject::NationalId(id)
                }
                status_input::Subject::Holder(h) => issue_code_request::Subject::Holder(h),
            };
            let mut admin = AdminServiceClient::new(conn.channel().await?);
            let reply = admin
                .issue_code(IssueCodeRequest {
                    subject: Some(subject),
                    name: name.unwrap_or_default(),
                })
                .await?
                .into_inner();
            outln!("{}", reply.token);
            let symbol = crate::cli::qr::symbol(&reply.token)?;
            eprintln!(
                "kid {}; expires {}; {} bytes, QR version {} (level {})",
                reply.kid,
                reply
                    .expires
                    .map(|t| format_time(t.seconds))
                    .unwrap_or_default(),
                reply.token.len(),
                crate::cli::qr::version(&symbol),
                crate::cli::qr::level(&symbol)
            );
            if let Some(path) = qr {
                crate::cli::qr::write(&symbol, &path)?;
                eprintln!("QR code written to {}", path.display());
            }
            if qr_terminal {
                eprintln!("{}", crate::cli::qr::to_terminal(&symbol));
            }
        }
        CodeCommand::Jwks { conn } => {
            let mut client = StatusLookupServiceClient::new(conn.channel().await?);
            let reply = client
                .get_jwks(GetJwksRequest::default())
                .await?
                .into_inner();
            let jwks: serde_json::Value = serde_json::from_str(&reply.jwks_json)?;
            outln!("{}", serde_json::to_string_pretty(&jwks)?);
            for kid in reply.revoked_kids {
                eprintln!("revoked: {kid}");
            }
        }
    }
    Ok(())
}

pub async fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let token = if args.token == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        s.trim().to_owned()
    } else {
        args.token.clone()
    };
    let policy = if args.negative_test_within_hours.is_some()
        || args.max_colour.is_some()
        || args.require_fresh
    {
        Some(Policy {
            max_negative_test_age: args
                .negative_test_within_hours
                .map(|h| hufu_proto::Duration {
                    seconds: h * 3600,
                    nanos: 0,
                }),
            max_colour: match &args.max_colour {
                Some(c) => parse_colour(c).map_err(anyhow::Error::msg)? as i32,
                None => 0,
            },
            require_fresh: args.require_fresh,
        })
    } else {
        None
    };
    let mut client = StatusLookupServiceClient::new(args.conn.channel().await?);
    let reply = client
        .verify(VerifyRequest {
            token,
            policy,
            national_id: args.national_id.clone().unwrap_or_default(),
        })
        .await?
        .into_inner();
    let verdict = Verdict::try_from(reply.verdict).unwrap_or_default();
    outln!(
        "verdict:            {}",
        verdict
            .as_str_name()
            .trim_start_matches("VERDICT_")
            .to_lowercase()
    );
    outln!("reason:             {}", reply.reason);
    if !reply.format.is_empty() {
        outln!("legacy format:      {}", reply.format);
    }
    if verdict != Verdict::Valid {
        return Ok(ExitCode::from(3));
    }
    if let Some(status) = &reply.status {
        print_record(status);
    }
    if !reply.masked_name.is_empty() {
        outln!("name:               {}", reply.masked_name);
    }
    if !reply.masked_national_id.is_empty() {
        outln!("national id:        {}", reply.masked_national_id);
    }
    let holder_match = HolderMatch::try_from(reply.holder_match).unwrap_or_default();
    if holder_match != HolderMatch::Unspecified {
        outln!(
            "holder match:       {}",
            holder_match
                .as_str_name()
                .trim_start_matches("HOLDER_MATCH_")
                .to_lowercase()
        );
    }
    if let Some(p) = &reply.provenance {
        let source = hufu_proto::v1::Source::try_from(p.source).unwrap_or_default();
        outln!(
            "source:             {}",
            source
                .as_str_name()
                .trim_start_matches("SOURCE_")
                .to_lowercase()
        );
        if let Some(age) = &p.age {
            outln!("age:                {}s", age.seconds);
        }
    }
    outln!("policy met:         {}", reply.policy_met);
    Ok(if holder_match == HolderMatch::False {
        // Someone else's code: whatever its colour, it does not admit.
        ExitCode::from(5)
    } else if reply.policy_met {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(4)
    })
}
