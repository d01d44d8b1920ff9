//! A federation where Guangdong declares a legacy code format: `GD1` and 20
//! base32 characters, or a URL carrying the same id.

use hufu_federation::legacy::LegacyFormat;
use hufu_node::local::{LocalFederation, LocalProvince};
use hufu_proto::v1::{
    LinkCodeRequest, LinkCodeResponse, UnlinkCodeRequest, UnlinkCodeResponse, link_code_request,
};

pub const GD: &str = "440000";
pub const SN: &str = "610000";
pub const TJ: &str = "120000";

/// Guangdong's format, as its trust list entry declares it.
pub fn yuekang() -> LegacyFormat {
    hufu_node::sample::legacy_format()
}

/// The `n`th code id: 20 base32 characters, different for every `n`.
pub fn code_id(n: u64) -> String {
    hufu_node::sample::legacy_code_id(n)
}

/// The `n`th code as printed: `GD1` and its id.
pub fn code(n: u64) -> String {
    format!("GD1{}", code_id(n))
}

/// The same code in its URL form.
pub fn url_code(n: u64) -> String {
    format!("https://jkm.gd.example/c/{}", code_id(n))
}

/// Guangdong, Shaanxi and Tianjin, quick to notice a stale replica, with
/// `tune` applied to each config; started.
pub async fn federation(
    root: &std::path::Path,
    tune: impl Fn(&mut hufu_node::config::NodeConfig),
) -> LocalFederation {
    super::logs();
    let provinces = [GD, SN, TJ].map(super::province);
    let mut fed = LocalFederation::init_declaring(
        root,
        &provinces,
        &[(super::province(GD), vec![yuekang()])],
        |c| {
            c.federation.heartbeat_ms = 100;
            c.federation.max_replica_age_secs = 1;
            c.federation.peer_deadline_ms = 300;
            c.federation.gossip_secs = 1;
            tune(c);
        },
    )
    .unwrap();
    fed.start_all().await.unwrap();
    fed
}

/// Links `code` at `issuer` to its `n`th sample holder.
pub async fn link(issuer: &LocalProvince, code: &str, n: u64) -> LinkCodeResponse {
    issuer
        .admin()
        .await
        .unwrap()
        .link_code(LinkCodeRequest {
            code: code.into(),
            subject: Some(link_code_request::Subject::NationalId(
                hufu_node::sample::national_id(issuer.province, n)
                    .as_str()
                    .to_owned(),
            )),
        })
        .await
        .unwrap()
        .into_inner()
}

pub async fn unlink(issuer: &LocalProvince, code: &str) -> UnlinkCodeResponse {
    issuer
        .admin()
        .await
        .unwrap()
        .unlink_code(UnlinkCodeRequest { code: code.into() })
        .await
        .unwrap()
        .into_inner()
}
