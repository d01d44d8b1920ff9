//! `hufu status`: statuses at this province's node, read and written with
//! an admin certificate, one holder or a whole import file.

use std::path::PathBuf;
use std::process::ExitCode;

use hufu_proto::v1::admin_service_client::AdminServiceClient;
use hufu_proto::v1::{
    Colour, GetStatusRequest, PutStatusRequest, StatusInput, StatusRecord, get_status_request,
    status_input,
};

use super::conn::ConnArgs;
use crate::output::outln;
use hufu_node::import;
use hufu_node::status::{
    colour_name, format_time, parse_colour, parse_reason, parse_time, reason_name, seconds,
    timestamp,
};

#[derive(Debug, clap::Args)]
pub struct HolderArgs {
    /// National id (GB 11643); pseudonymised at the node, never stored.
    #[arg(
        long = "id",
        conflicts_with = "holder",
        required_unless_present = "holder"
    )]
    pub national_id: Option<String>,
    /// Holder pseudonym.
    #[arg(long)]
    pub holder: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum StatusCommand {
    /// Import statuses from CSV (header: national_id,colour,as_of,last_negative_test,reason,legacy_code) or JSON Lines.
    Import {
        file: PathBuf,
        #[arg(long, value_enum)]
        format: Option<import::Format>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Set one holder's status.
    Set {
        #[command(flatten)]
        who: HolderArgs,
        /// green, yellow or red.
        #[arg(long)]
        colour: String,
        /// none, close_contact, positive_test, high_risk_travel, missing_test.
        #[arg(long, default_value = "none")]
        reason: String,
        /// When the colour was decided (RFC 3339 or Unix seconds); default now.
        #[arg(long)]
        as_of: Option<String>,
        /// Last negative test (RFC 3339 or Unix seconds).
        #[arg(long)]
        negative_test: Option<String>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Read one holder's status.
    Get {
        #[command(flatten)]
        who: HolderArgs,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

pub fn input(who: &HolderArgs) -> status_input::Subject {
    match (&who.national_id, &who.holder) {
        (Some(id), _) => status_input::Subject::NationalId(id.clone()),
        (None, Some(h)) => status_input::Subject::Holder(h.clone()),
        (None, None) => unreachable!("clap requires --id or --holder"),
    }
}

pub async fn status(cmd: StatusCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        StatusCommand::Import { file, format, conn } => {
            // The header and emptiness are checked before dialling; the rows
            // are read while they stream.
            let reader = import::Reader::open(&file, format)?;
            let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
            let channel = conn.channel().await?;
            let name = file.display().to_string();
            let outcome = import::send(reader, size, channel, &name).await?;
            for r in &outcome.rejected {
                eprintln!("{name}:{}: {}", r.line, r.reason);
            }
            let unlisted = outcome
                .rejected_count
                .saturating_sub(outcome.rejected.len() as u64);
            if unlisted > 0 {
                eprintln!(
                    "{name}: {unlisted} more rejected lines not listed (the first {} are); fix those and run the import again to see the rest",
                    outcome.rejected.len()
                );
            }
            outln!(
                "imported {} of {} rows from {name}; {} rejected",
                outcome.accepted,
                outcome.lines,
                outcome.rejected_count
            );
            return Ok(if outcome.rejected_count == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            });
        }
        StatusCommand::Set {
            who,
            colour,
            reason,
            as_of,
            negative_test,
            conn,
        } => {
            let status = StatusInput {
                subject: Some(input(&who)),
                colour: parse_colour(&colour).map_err(anyhow::Error::msg)? as i32,
                as_of: match as_of {
                    Some(t) => parse_time(&t).map_err(anyhow::Error::msg)?.map(timestamp),
                    None => None,
                },
                last_negative_test: match negative_test {
                    Some(t) => parse_time(&t).map_err(anyhow::Error::msg)?.map(timestamp),
                    None => None,
                },
                reason: parse_reason(&reason).map_err(anyhow::Error::msg)? as i32,
            };
            let mut admin = AdminServiceClient::new(conn.channel().await?);
            let reply = admin
                .put_status(PutStatusRequest {
                    status: Some(status),
                })
                .await?
                .into_inner();
            if let Some(record) = reply.record {
                print_record(&record);
            }
            outln!("sequence:           {}", reply.sequence);
        }
        StatusCommand::Get { who, conn } => {
            let subject = match input(&who) {
                status_input::Subject::NationalId(id) => {
                    get_status_request::Subject::NationalId(id)
                }
                status_input::Subject::Holder(h) => get_status_request::Subject::Holder(h),
            };
            let mut admin = AdminServiceClient::new(conn.channel().await?);
            let reply = admin
                .get_status(GetStatusRequest {
                    subject: Some(subject),
                })
                .await?
                .into_inner();
            if let Some(record) = reply.record {
                print_record(&record);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn print_record(record: &StatusRecord) {
    let colour = Colour::try_from(record.colour).unwrap_or(Colour::Unspecified);
    let reason = hufu_proto::v1::Reason::try_from(record.reason).unwrap_or_default();
    outln!("issuer:             {}", record.issuer);
    outln!("holder:             {}", record.holder);
    outln!("colour:             {}", colour_name(colour));
    outln!("reason:             {}", reason_name(reason));
    if let Some(t) = seconds(record.as_of.as_ref()) {
        outln!("as of:              {}", format_time(t));
    }
    if let Some(t) = seconds(record.last_negative_test.as_ref()) {
        outln!("last negative test: {}", format_time(t));
    }
}
