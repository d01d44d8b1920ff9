//! Sample holders for the demo and the benchmarks: syntactically valid
//! national ids (correct GB 11643 check character) that belong to nobody,
//! and a sample legacy code format with codes of it.

use hufu_certs::Province;
use hufu_federation::holder::NationalId;
use hufu_federation::legacy::LegacyFormat;

/// A province's existing codes as the demo, the benchmarks and the tests
/// declare them: `GD1` and 20 base32 characters, or a URL carrying the
/// same id.
pub fn legacy_format() -> LegacyFormat {
    LegacyFormat {
        name: "yuekang".into(),
        prefix: String::new(),
        pattern: r"(?:GD1|https://jkm\.gd\.example/c/)([A-Z2-7]{20})".into(),
        max_len: 64,
        example: "GD1ABCDEFGHIJKLMNOPQRST".into(),
    }
}

/// The `n`th sample legacy code id: 20 base32 characters, a different one
/// for every `n`, that look random.
pub fn legacy_code_id(n: u64) -> String {
    const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    // A xor and a multiplication by an odd number are bijections of u64:
    // the first 13 characters alone tell every n apart.
    let mixed = (n ^ 0x5DEE_CE66_D1CE_4E5B).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let more = (n ^ 0x2545_F491_4F6C_DD1D)
        .rotate_left(29)
        .wrapping_mul(0xD6E8_FEB8_6659_FD93);
    (0..20)
        .map(|i| {
            let v = if i < 13 {
                mixed >> (5 * i)
            } else {
                more >> (5 * (i - 13))
            };
            BASE32[(v & 31) as usize] as char
        })
        .collect()
}

/// The `n`th sample national id of a province: unique for n < 16,800,000.
pub fn national_id(province: Province, n: u64) -> NationalId {
    let date = n / 1000;
    let seq = n % 1000;
    let year = 1950 + date % 50;
    let month = 1 + (date / 50) % 12;
    let day = 1 + (date / 600) % 28;
    let area = province.code() / 10_000 * 10_000 + 100;
    NationalId::with_check_character(&format!("{area:06}{year:04}{month:02}{day:02}{seq:03}"))
        .expect("17 digits")
}

#[cfg(test)]
mod tests {
    #[test]
    fn sample_legacy_codes_are_distinct_codes_of_the_sample_format() {
        let regex = super::legacy_format().compile().unwrap();
        let ids: std::collections::HashSet<String> =
            (0..10_000).map(super::legacy_code_id).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(100) {
            assert!(regex.is_match(&format!("GD1{id}")), "{id}");
        }
    }

    use super::*;

    #[test]
    fn unique_and_valid() {
        let p = Province::parse("440000").unwrap();
        let ids: std::collections::HashSet<String> = (0..5000)
            .map(|n| national_id(p, n).as_str().to_owned())
            .collect();
        assert_eq!(ids.len(), 5000);
        assert!(
            ids.iter()
                .all(|id| NationalId::parse(id).is_ok() && id.starts_with("440100"))
        );
    }
}
