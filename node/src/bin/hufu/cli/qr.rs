//! Rendering a code as a QR code: PNG, SVG or text for a terminal.

use std::path::Path;

use anyhow::Context;
use qrcode::{EcLevel, QrCode};

/// Largest QR version a code should need: beyond it the modules get small on
/// a phone screen or a printed card and scanning slows down.
pub const MAX_COMFORTABLE_VERSION: i16 = 15;

/// The QR symbol for a token, holding its numeric QR text
/// ([`hufu_federation::codes::qr`]), at error-correction level M (15% damage
/// tolerated: a phone screen with glare still scans) when that fits in
/// [`MAX_COMFORTABLE_VERSION`], else at level L, because a smaller symbol
/// scans better than a more redundant one. An ES256 code with a masked name
/// and id (462 to 486 characters) needs version 15 at level M.
pub fn symbol(token: &str) -> anyhow::Result<QrCode> {
    let text = hufu_federation::codes::qr::to_qr_text(token);
    let at = |level| {
        // The encoder picks the modes: alphanumeric for the prefix,
        // numeric for the digits.
        QrCode::with_error_correction_level(text.as_bytes(), level)
            .context("token does not fit in a QR code")
    };
    let m = at(EcLevel::M)?;
    if version(&m) <= MAX_COMFORTABLE_VERSION {
        return Ok(m);
    }
    let l = at(EcLevel::L)?;
    Ok(if version(&l) < version(&m) { l } else { m })
}

/// The error-correction level of a symbol: L, M, Q or H.
pub fn level(code: &QrCode) -> &'static str {
    match code.error_correction_level() {
        EcLevel::L => "L",
        EcLevel::M => "M",
        EcLevel::Q => "Q",
        EcLevel::H => "H",
    }
}

/// The QR version (1..=40) a token needs; lower scans more comfortably.
pub fn version(code: &QrCode) -> i16 {
    match code.version() {
        qrcode::Version::Normal(v) | qrcode::Version::Micro(v) => v,
    }
}

/// Writes a PNG or SVG, chosen by the file extension.
pub fn write(code: &QrCode, path: &Path) -> anyhow::Result<()> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("png") => code
            .render::<image::Luma<u8>>()
            .min_dimensions(400, 400)
            .build()
            .save(path)
            .with_context(|| format!("cannot write {}", path.display())),
        Some("svg") => {
            let svg = code
                .render::<qrcode::render::svg::Color<'_>>()
                .min_dimensions(400, 400)
                .build();
            std::fs::write(path, svg).with_context(|| format!("cannot write {}", path.display()))
        }
        _ => anyhow::bail!("QR output must end in .png or .svg: {}", path.display()),
    }
}

/// Text rendering with half-block characters, two modules per character row.
pub fn to_terminal(code: &QrCode) -> String {
    code.render::<qrcode::render::unicode::Dense1x2>()
        .dark_color(qrcode::render::unicode::Dense1x2::Light)
        .light_color(qrcode::render::unicode::Dense1x2::Dark)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token-shaped string of `len` characters.
    fn token_of(len: usize) -> String {
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        (0..len)
            .map(|i| match i {
                90 | 375 => '.',
                _ => alphabet[(i * 7) % 64] as char,
            })
            .collect()
    }

    #[test]
    fn the_longest_code_fits_version_15_at_level_m_only_in_numeric_form() {
        // An ES256 code whose masked name is as long as any (25 bytes) is
        // 486 characters; in byte mode it would need version 17 at level M.
        let token = token_of(486);
        let code = symbol(&token).unwrap();
        assert_eq!((version(&code), level(&code)), (15, "M"));
        let bytes = QrCode::with_error_correction_level(token.as_bytes(), EcLevel::M).unwrap();
        assert!(
            version(&bytes) > MAX_COMFORTABLE_VERSION,
            "{}",
            version(&bytes)
        );
        // A code with the shortest display data (a two-character name).
        let code = symbol(&token_of(460)).unwrap();
        assert_eq!((version(&code), level(&code)), (15, "M"));
    }
}
