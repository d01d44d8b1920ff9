//! Rendering a code as a QR code: PNG, SVG or text for a terminal.

use std::path::Path;

use anyhow::Context;
use qrcode::{EcLevel, QrCode};

/// The QR symbol for a token, at error-correction level M (15% damage
/// tolerated: a phone screen with glare still scans).
pub fn symbol(token: &str) -> anyhow::Result<QrCode> {
    QrCode::with_error_correction_level(token.as_bytes(), EcLevel::M)
        .context("token does not fit in a QR code")
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
