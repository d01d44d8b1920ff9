//! The trusted province CAs, one per province, swappable at runtime.
//!
//! The trust list decides which provinces are members; when it changes, the
//! node calls [`TrustAnchors::replace`] and every later handshake sees the new
//! set. Each anchor keeps webpki verifiers built for that one CA alone, so a
//! certificate is only ever checked against the CA of the province it names.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::DistinguishedName;
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;

use crate::authority::ca_province;
use crate::{CertError, Province};

/// The set of trusted province CAs. Shared as `Arc<TrustAnchors>` between
/// the TLS configs that read it and the trust-list code that replaces it.
pub struct TrustAnchors {
    provider: Arc<CryptoProvider>,
    // Lock-free reads: every handshake loads it, replacements are rare.
    current: ArcSwap<AnchorSet>,
}

/// One immutable version of the anchor set.
#[derive(Debug)]
pub(crate) struct AnchorSet {
    by_province: BTreeMap<Province, Anchor>,
    /// Subjects of all anchors, sent as hints in the server's
    /// CertificateRequest. `'static` because rustls borrows the hints from
    /// the verifier for the length of a handshake, while the set may be
    /// replaced meanwhile; see [`leak_hints`].
    pub(crate) hints: &'static [DistinguishedName],
}

/// One province's CA and the verifiers that trust it alone.
#[derive(Debug)]
pub(crate) struct Anchor {
    cert: CertificateDer<'static>,
    /// The CA's basicConstraints pathLenConstraint. webpki keeps only a
    /// trust anchor's name and key, so the anchor's own limit on sub-CAs
    /// below it is enforced here (see [`Anchor::check_path_len`]).
    path_len: Option<u32>,
    /// Checks client chains: signature, validity, EKU clientAuth.
    pub(crate) client: Arc<dyn ClientCertVerifier>,
    /// Checks server chains: signature, validity, EKU serverAuth, host name.
    pub(crate) server: Arc<WebPkiServerVerifier>,
}

impl fmt::Debug for TrustAnchors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustAnchors")
            .field("provinces", &self.provinces())
            .finish()
    }
}

impl TrustAnchors {
    /// Trusts `cas`, each a province CA certificate (DER) whose province is
    /// read from its `spiffe://hufu/province/<code>/ca` URI SAN. Two CAs for
    /// one province are an error.
    pub fn new(
        cas: impl IntoIterator<Item = CertificateDer<'static>>,
    ) -> Result<Arc<Self>, CertError> {
        let provider = crate::tls::crypto_provider();
        let set = AnchorSet::build(&provider, cas, None)?;
        Ok(Arc::new(TrustAnchors {
            provider,
            current: ArcSwap::from_pointee(set),
        }))
    }

    /// Atomically replaces the whole set. Handshakes already past
    /// verification are unaffected; new ones use the new set. On error the
    /// old set stays in force.
    pub fn replace(
        &self,
        cas: impl IntoIterator<Item = CertificateDer<'static>>,
    ) -> Result<(), CertError> {
        let old = self.current.load();
        let set = AnchorSet::build(&self.provider, cas, Some(old.hints))?;
        self.current.store(Arc::new(set));
        let provinces = self.provinces();
        tracing::info!(
            count = provinces.len(),
            ?provinces,
            "trust anchors replaced"
        );
        Ok(())
    }

    /// The trusted provinces, in code order.
    pub fn provinces(&self) -> Vec<Province> {
        self.current.load().by_province.keys().copied().collect()
    }

    /// The CA certificate trusted for `p`, if any.
    pub fn ca_for(&self, p: Province) -> Option<CertificateDer<'static>> {
        self.current
            .load()
            .by_province
            .get(&p)
            .map(|anchor| anchor.cert.clone())
    }

    /// The current set, for one handshake's verification.
    pub(crate) fn snapshot(&self) -> Arc<AnchorSet> {
        self.current.load_full()
    }

    pub(crate) fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }
}

impl AnchorSet {
    fn build(
        provider: &Arc<CryptoProvider>,
        cas: impl IntoIterator<Item = CertificateDer<'static>>,
        previous_hints: Option<&'static [DistinguishedName]>,
    ) -> Result<AnchorSet, CertError> {
        let mut by_province = BTreeMap::new();
        for cert in cas {
            let province = ca_province(&cert)?;
            if by_province.contains_key(&province) {
                return Err(CertError::DuplicateAnchor(province));
            }
            let mut roots = RootCertStore::empty();
            roots.add(cert.clone())?;
            let roots = Arc::new(roots);
            let client =
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                    .build()?;
            let server =
                WebPkiServerVerifier::builder_with_provider(roots, provider.clone()).build()?;
            let path_len = ca_path_len(&cert)?;
            by_province.insert(
                province,
                Anchor {
                    cert,
                    path_len,
                    client,
                    server,
                },
            );
        }
        let hints = by_province
            .values()
            .flat_map(|anchor| anchor.client.root_hint_subjects().iter().cloned())
            .collect();
        Ok(AnchorSet {
            by_province,
            hints: leak_hints(hints, previous_hints),
        })
    }

    pub(crate) fn get(&self, province: Province) -> Option<&Anchor> {
        self.by_province.get(&province)
    }
}

impl Anchor {
    /// Refuses a chain whose path to this CA holds more sub-CAs than the
    /// CA's pathLenConstraint allows (Hufu's province CAs say pathlen:0:
    /// leaves only). Called after the ordinary webpki check succeeded; a
    /// chain without intermediates always passes, so the usual handshake
    /// pays nothing.
    pub(crate) fn check_path_len(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
        algorithms: &WebPkiSupportedAlgorithms,
    ) -> Result<(), CertError> {
        let Some(max) = self.path_len else {
            return Ok(());
        };
        if intermediates.is_empty() {
            return Ok(());
        }
        let refused = |detail: String| CertError::PathLen { max, detail };
        let leaf = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| refused(format!("unreadable certificate: {e}")))?;
        let anchor = webpki::anchor_from_trusted_cert(&self.cert)
            .map_err(|e| refused(format!("unreadable ca certificate: {e}")))?;
        let within = |path: &webpki::VerifiedPath<'_>| {
            if path.intermediate_certificates().count() > max as usize {
                Err(webpki::Error::PathLenConstraintViolated)
            } else {
                Ok(())
            }
        };
        leaf.verify_for_usage(
            algorithms.all,
            &[anchor],
            intermediates,
            now,
            usage,
            None,
            Some(&within),
        )
        .map(|_| ())
        .map_err(|e| refused(format!("{e:?}")))
    }
}

/// A CA certificate's pathLenConstraint, if it has one.
fn ca_path_len(cert: &CertificateDer<'_>) -> Result<Option<u32>, CertError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| CertError::BadCertificate(e.to_string()))?;
    let constraints = parsed
        .basic_constraints()
        .map_err(|e| CertError::BadCertificate(e.to_string()))?;
    Ok(constraints.and_then(|c| c.value.path_len_constraint))
}

/// Gives the hint list a `'static` lifetime.
///
/// `ClientCertVerifier::root_hint_subjects` returns a slice borrowed from the
/// verifier, but the verifier must follow [`TrustAnchors::replace`], so the
/// slice cannot live inside the swappable set. Leaking it is bounded: a new
/// list is leaked only when the set of CA subjects actually changes, which
/// happens on trust-list membership changes (a governance event, a few per
/// year) and costs about 100 bytes per province.
fn leak_hints(
    hints: Vec<DistinguishedName>,
    previous: Option<&'static [DistinguishedName]>,
) -> &'static [DistinguishedName] {
    match previous {
        Some(previous)
            if previous.len() == hints.len()
                && previous
                    .iter()
                    .zip(&hints)
                    .all(|(a, b)| a.as_ref() == b.as_ref()) =>
        {
            previous
        }
        _ => Vec::leak(hints),
    }
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::pem::PemObject;

    use super::*;
    use crate::{CertificateAuthority, Identity, LeafOptions, Role};

    fn province(code: &str) -> Province {
        Province::parse(code).unwrap()
    }

    #[test]
    fn reads_provinces_from_the_cas() {
        let gd = CertificateAuthority::generate(province("440000")).unwrap();
        let sn = CertificateAuthority::generate(province("610000")).unwrap();
        let anchors = TrustAnchors::new([sn.cert_der(), gd.cert_der()]).unwrap();
        assert_eq!(
            anchors.provinces(),
            [province("440000"), province("610000")]
        );
        assert_eq!(anchors.ca_for(province("440000")), Some(gd.cert_der()));
        assert_eq!(anchors.ca_for(province("110000")), None);
        assert_eq!(anchors.snapshot().hints.len(), 2);
    }

    #[test]
    fn refuses_duplicates_and_non_cas() {
        let gd = CertificateAuthority::generate(province("440000")).unwrap();
        let gd2 = CertificateAuthority::generate(province("440000")).unwrap();
        let err = TrustAnchors::new([gd.cert_der(), gd2.cert_der()]).unwrap_err();
        assert!(matches!(err, CertError::DuplicateAnchor(_)), "{err}");

        let id = Identity::new(province("440000"), Role::Node, "gd-1").unwrap();
        let leaf = gd.issue(&id, &LeafOptions::default()).unwrap();
        let leaf = CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap();
        let err = TrustAnchors::new([leaf]).unwrap_err();
        assert!(matches!(err, CertError::NotACa), "{err}");
    }

    #[test]
    fn replace_swaps_atomically_or_not_at_all() {
        let gd = CertificateAuthority::generate(province("440000")).unwrap();
        let sn = CertificateAuthority::generate(province("610000")).unwrap();
        let anchors = TrustAnchors::new([gd.cert_der()]).unwrap();
        let hints = anchors.snapshot().hints;

        anchors.replace([gd.cert_der()]).unwrap();
        // Same subjects: the hint list is reused, not leaked again.
        assert!(std::ptr::eq(hints, anchors.snapshot().hints));

        anchors.replace([gd.cert_der(), sn.cert_der()]).unwrap();
        assert_eq!(
            anchors.provinces(),
            [province("440000"), province("610000")]
        );

        assert!(anchors.replace([sn.cert_der(), sn.cert_der()]).is_err());
        assert_eq!(
            anchors.provinces(),
            [province("440000"), province("610000")]
        );
    }
}
