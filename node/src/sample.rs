//! Sample holders for the demo and the benchmarks: syntactically valid
//! national ids (correct GB 11643 check character) that belong to nobody.

use hufu_certs::Province;
use hufu_federation::holder::NationalId;

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
