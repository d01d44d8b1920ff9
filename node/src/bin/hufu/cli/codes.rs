//! `hufu codes`: this province's existing (legacy) codes, bound to its
//! holders so that every member's nodes recognise them. A code is given as
//! its holder carries it (the text its QR code holds); the node keeps only
//! a hash of its id.

use hufu_proto::v1::admin_service_client::AdminServiceClient;
use hufu_proto::v1::{LinkCodeRequest, UnlinkCodeRequest, link_code_request, status_input};

use super::conn::ConnArgs;
use super::status::{HolderArgs, input};
use crate::output::outln;

#[derive(Debug, clap::Subcommand)]
pub enum CodesCommand {
    /// Bind a legacy code to a holder: it then verifies at every member's
    /// nodes with the holder's status (admin certificate).
    Link {
        /// The code as its holder carries it, e.g. GD1ABCDEFGHIJKLMNOPQRST
        /// or the URL form; it must match one of this province's formats
        /// in the trust list.
        code: String,
        #[command(flatten)]
        who: HolderArgs,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Unbind (revoke) a legacy code: it is UNKNOWN_CODE everywhere from
    /// then on (admin certificate).
    Unlink {
        /// The code as its holder carries it.
        code: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

pub async fn codes(cmd: CodesCommand) -> anyhow::Result<()> {
    match cmd {
        CodesCommand::Link { code, who, conn } => {
            let subject = match input(&who) {
                status_input::Subject::NationalId(id) => link_code_request::Subject::NationalId(id),
                status_input::Subject::Holder(h) => link_code_request::Subject::Holder(h),
            };
            let reply = AdminServiceClient::new(conn.channel().await?)
                .link_code(LinkCodeRequest {
                    code,
                    subject: Some(subject),
                })
                .await?
                .into_inner();
            match reply.sequence {
                0 => outln!(
                    "{} code already bound to holder {}",
                    reply.format,
                    reply.holder
                ),
                n => outln!(
                    "{} code bound to holder {} (change {n})",
                    reply.format,
                    reply.holder
                ),
            }
        }
        CodesCommand::Unlink { code, conn } => {
            let reply = AdminServiceClient::new(conn.channel().await?)
                .unlink_code(UnlinkCodeRequest { code })
                .await?
                .into_inner();
            match reply.sequence {
                0 => outln!("{} code was not bound: nothing to do", reply.format),
                n => outln!("{} code unbound (change {n})", reply.format),
            }
        }
    }
    Ok(())
}
