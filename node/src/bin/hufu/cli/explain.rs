//! What an operator reads when a `hufu` command fails: a refusal from the
//! node is its status message said plainly (not tonic's `Display`, which
//! prints code descriptions and metadata), a cause is said once, and a
//! failure to reach the node comes with what to check.

use std::error::Error as _;
use std::sync::OnceLock;

use hufu_certs::Province;

/// The node a client command dialled, named in hints about connections.
static DIALLED: OnceLock<(String, Province)> = OnceLock::new();

/// Records the node the command dials (the first one, if several).
pub fn dialled(endpoint: &str, province: Province) {
    let _ = DIALLED.set((endpoint.to_owned(), province));
}

/// One line for `err`, saying what to do where that is known.
pub fn explain(err: &anyhow::Error) -> String {
    let mut text = String::new();
    let mut link = false;
    let mut causes = String::new();
    for cause in err.chain() {
        if let Some(status) = cause.downcast_ref::<tonic::Status>() {
            if status.source().is_none() {
                // The node answered: its message is written for people.
                append(
                    &mut text,
                    &format!("{}: {}", words(status.code()), status.message()),
                );
                break;
            }
            link = true;
            append(&mut text, status.message());
            continue;
        }
        let said = cause.to_string();
        causes.push_str(&said.to_lowercase());
        causes.push(' ');
        if cause.downcast_ref::<tonic::transport::Error>().is_some() {
            link = true;
        }
        append(&mut text, &said);
    }
    if link && let Some(hint) = hint(&causes) {
        text.push_str(": ");
        text.push_str(&hint);
    }
    text
}

/// Appends `part` unless it was already said (tonic's transport errors
/// repeat their source in their own text).
fn append(text: &mut String, part: &str) {
    let part = part.trim();
    if part.is_empty() || text.contains(part) {
        return;
    }
    if !text.is_empty() {
        text.push_str(": ");
    }
    text.push_str(part);
}

fn node() -> String {
    match DIALLED.get() {
        Some((endpoint, province)) => format!("the node at {endpoint} (province {province})"),
        None => "the node".into(),
    }
}

fn hint(causes: &str) -> Option<String> {
    let has = |s: &str| causes.contains(s);
    if has("connection refused") {
        return Some(format!(
            "nothing accepts connections there: {} may not be running (`hufu serve`), or --endpoint / client.endpoint names the wrong address",
            node()
        ));
    }
    if has("certificateunknown")
        || has("badcertificate")
        || has("unknownca")
        || has("certificaterevoked")
        || has("certificateexpired")
        || has("connection closed")
        || has("connection reset")
        || has("broken pipe")
        || has("canceled")
    {
        return Some(format!(
            "{} closed the connection after the TLS handshake: it does not trust your certificate. A node accepts certificates from its own province's CA and from the CAs of the members of its trust list: check --cert/--key, and that your province is a member of its federation",
            node()
        ));
    }
    if has("invalid peer certificate") {
        return Some(format!(
            "{} presented a certificate your side does not accept: check --ca (the CA of the province dialled), --province and the host name in --endpoint",
            node()
        ));
    }
    if has("timed out") || has("deadline") {
        return Some(format!("{} did not answer in time", node()));
    }
    None
}

/// A status code in words, lowercase: `invalid argument`, `not found`.
fn words(code: tonic::Code) -> String {
    format!("{code:?}")
        .chars()
        .enumerate()
        .flat_map(|(i, c)| {
            let space = (i > 0 && c.is_uppercase()).then_some(' ');
            space.into_iter().chain(c.to_lowercase())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_reads_as_its_message() {
        let err = anyhow::Error::new(tonic::Status::invalid_argument(
            "holder id must be 26 characters",
        ));
        assert_eq!(
            explain(&err),
            "invalid argument: holder id must be 26 characters"
        );
        let err =
            anyhow::Error::new(tonic::Status::permission_denied("no")).context("import failed");
        assert_eq!(explain(&err), "import failed: permission denied: no");
    }

    #[test]
    fn a_cause_is_said_once() {
        let io = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        );
        let err =
            anyhow::Error::new(io).context("transport error: Connection refused (os error 111)");
        let text = explain(&err);
        assert_eq!(text.matches("Connection refused").count(), 1, "{text}");
    }
}
