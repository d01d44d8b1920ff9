//! `hufu keys`: rotate and revoke this province's code-signing keys.

use hufu_proto::v1::admin_service_client::AdminServiceClient;
use hufu_proto::v1::{RevokeKeyRequest, RotateKeyRequest};

use super::conn::ConnArgs;
use crate::output::outln;

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Start signing with a new key; the old one stays published until its codes expire.
    Rotate {
        /// es256 or eddsa.
        #[arg(long, default_value = "es256")]
        alg: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Revoke a key: every code it signed is refused from now on.
    Revoke {
        kid: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

pub async fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Rotate { alg, conn } => {
            let mut admin = AdminServiceClient::new(conn.channel().await?);
            let reply = admin
                .rotate_key(RotateKeyRequest { algorithm: alg })
                .await?
                .into_inner();
            outln!("new signing key:  {}", reply.kid);
            outln!(
                "previous key:     {} (published until its codes expire)",
                reply.previous_kid
            );
        }
        KeysCommand::Revoke { kid, conn } => {
            let mut admin = AdminServiceClient::new(conn.channel().await?);
            admin
                .revoke_key(RevokeKeyRequest { kid: kid.clone() })
                .await?;
            outln!("revoked {kid}: codes it signed are refused from now on");
        }
    }
    Ok(())
}
