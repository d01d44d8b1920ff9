//! Provinces, named by their GB/T 2260 six-digit codes.
//!
//! A province is the unit of trust in Hufu: each one runs its own CA and its
//! own nodes, so its code appears in every identity and every CA.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::CertError;

/// The 34 provincial-level divisions, in code order (binary search relies on
/// the order).
const PROVINCES: [(u32, &str); 34] = [
    (110000, "Beijing"),
    (120000, "Tianjin"),
    (130000, "Hebei"),
    (140000, "Shanxi"),
    (150000, "Inner Mongolia"),
    (210000, "Liaoning"),
    (220000, "Jilin"),
    (230000, "Heilongjiang"),
    (310000, "Shanghai"),
    (320000, "Jiangsu"),
    (330000, "Zhejiang"),
    (340000, "Anhui"),
    (350000, "Fujian"),
    (360000, "Jiangxi"),
    (370000, "Shandong"),
    (410000, "Henan"),
    (420000, "Hubei"),
    (430000, "Hunan"),
    (440000, "Guangdong"),
    (450000, "Guangxi"),
    (460000, "Hainan"),
    (500000, "Chongqing"),
    (510000, "Sichuan"),
    (520000, "Guizhou"),
    (530000, "Yunnan"),
    (540000, "Tibet"),
    (610000, "Shaanxi"),
    (620000, "Gansu"),
    (630000, "Qinghai"),
    (640000, "Ningxia"),
    (650000, "Xinjiang"),
    (710000, "Taiwan"),
    (810000, "Hong Kong"),
    (820000, "Macao"),
];

/// A provincial-level division by its GB/T 2260 six-digit code.
///
/// Only the 34 known codes can be constructed, so a `Province` in hand is
/// always valid. It serializes as its six-digit string, such as `"440000"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Province(u32);

impl Province {
    /// Parses a six-digit code such as `"440000"`.
    pub fn parse(code: &str) -> Result<Province, CertError> {
        if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CertError::MalformedProvince(code.to_owned()));
        }
        let number: u32 = code
            .parse()
            .map_err(|_| CertError::MalformedProvince(code.to_owned()))?;
        Self::from_code(number)
    }

    /// The province with this numeric code, such as `440000`.
    pub fn from_code(code: u32) -> Result<Province, CertError> {
        match PROVINCES.binary_search_by_key(&code, |&(c, _)| c) {
            Ok(_) => Ok(Province(code)),
            Err(_) => Err(CertError::UnknownProvince(format!("{code:06}"))),
        }
    }

    /// The numeric code, such as `440000`.
    pub fn code(&self) -> u32 {
        self.0
    }

    /// The English name, such as `"Guangdong"`.
    pub fn name(&self) -> &'static str {
        PROVINCES
            .binary_search_by_key(&self.0, |&(c, _)| c)
            .map(|i| PROVINCES[i].1)
            // Unreachable: every constructor checks the code against the table.
            .unwrap_or("unknown")
    }

    /// All 34 provinces, in code order.
    pub fn all() -> impl Iterator<Item = Province> {
        PROVINCES.iter().map(|&(code, _)| Province(code))
    }
}

impl FromStr for Province {
    type Err = CertError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Province::parse(s)
    }
}

impl fmt::Display for Province {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:06}", self.0)
    }
}

impl Serialize for Province {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Province {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let code = String::deserialize(deserializer)?;
        Province::parse(&code).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_codes() {
        let gd = Province::parse("440000").unwrap();
        assert_eq!(gd.code(), 440000);
        assert_eq!(gd.name(), "Guangdong");
        assert_eq!(gd.to_string(), "440000");
        assert_eq!("610000".parse::<Province>().unwrap().name(), "Shaanxi");
    }

    #[test]
    fn malformed_codes_say_six_digits() {
        for bad in ["44000", "4400000", "44000a", "", " 440000", "+44000"] {
            let err = Province::parse(bad).unwrap_err();
            assert!(matches!(err, CertError::MalformedProvince(_)), "{bad:?}");
            assert!(err.to_string().contains("six digits"), "{err}");
        }
    }

    #[test]
    fn unknown_codes_are_named() {
        for bad in ["999999", "440100", "000000"] {
            let err = Province::parse(bad).unwrap_err();
            assert!(matches!(err, CertError::UnknownProvince(_)), "{bad:?}");
            assert!(err.to_string().contains(bad), "{err}");
        }
        assert_eq!(
            Province::parse("999999").unwrap_err().to_string(),
            "unknown province 999999: not a GB/T 2260 provincial code"
        );
    }

    #[test]
    fn all_lists_34_in_order() {
        let all: Vec<Province> = Province::all().collect();
        assert_eq!(all.len(), 34);
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(all[0].name(), "Beijing");
        assert_eq!(all[33].name(), "Macao");
        for p in all {
            assert_eq!(Province::parse(&p.to_string()).unwrap(), p);
        }
    }

    #[test]
    fn serde_uses_the_six_digit_string() {
        let gd = Province::parse("440000").unwrap();
        assert_eq!(serde_json::to_string(&gd).unwrap(), "\"440000\"");
        assert_eq!(serde_json::from_str::<Province>("\"440000\"").unwrap(), gd);
        assert!(serde_json::from_str::<Province>("\"999999\"").is_err());
        assert!(serde_json::from_str::<Province>("440000").is_err());
    }
}
