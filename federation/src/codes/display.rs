//! What a code shows a checkpoint beside the colour: the holder's name and
//! national id, masked the way China's provincial code apps show them, so a
//! checkpoint can compare the code with the person and their identity card
//! while the code never carries enough to recover either.
//!
//! The rules follow GB/T 35273 (personal information de-identification)
//! practice: show the least that still lets a person be told apart.
//!
//! **Names.** A name is one or more words: Han names are one word; names in
//! alphabetic scripts are split on spaces, and minority names written in Han
//! characters on the middle dot (`买买提·艾力`).
//!
//! - A one-word Han (or Hangul, or kana) name keeps its surname, one
//!   character or one of the common compound surnames (`欧阳`, `司马`, …).
//!   After a one-character surname, a given name of two characters or more
//!   also keeps its last character: `张*`, `张*三`, `张**明`; after a
//!   compound surname nothing more is shown: `欧阳*`, `欧阳**`.
//! - Any other word keeps its first letter: `J*** S****` becomes `J*** S***`
//!   because, everywhere, a masked run is at most three asterisks (a long
//!   name's length is not revealed, and the code stays small).
//! - Of a name of more than three words the first two and the last are
//!   shown: `M*** d** C*** L***` shows as `M*** d** L***`.
//!
//! The masked name is at most 25 bytes of UTF-8 whatever the input.
//!
//! **National ids.** The first four characters (province and city of
//! registration) and the last four (sequence and check character) are kept,
//! the ten between (county and date of birth) are masked:
//! `4401**********002X`.

use super::CodeError;
use crate::holder::NationalId;

/// The mask character.
const MASK: char = '*';
/// Longest run of mask characters in a masked name.
const MAX_RUN: usize = 3;
/// Longest name accepted, in characters.
pub const MAX_NAME_CHARS: usize = 64;
/// Words of a long name that are shown: the first ones, then the last.
const SHOWN_WORDS: usize = 3;

/// Common two-character Han surnames (复姓): a name beginning with one of
/// these keeps both characters as its surname.
const COMPOUND_SURNAMES: &[&str] = &[
    "欧阳", "司马", "上官", "诸葛", "东方", "皇甫", "尉迟", "公孙", "慕容", "长孙", "宇文", "司徒",
    "夏侯", "轩辕", "令狐", "钟离", "端木", "独孤", "南宫", "西门", "呼延", "澹台", "公冶", "宗政",
    "濮阳", "太叔", "申屠", "闻人", "赫连", "万俟", "司空", "百里", "东郭", "拓跋", "第五", "左丘",
    "公羊", "谷梁", "梁丘", "乐正", "亓官", "仲孙", "单于", "鲜于", "闾丘", "段干", "巫马", "子车",
];

/// Separators between the words of a name: spaces, and the middle dots of
/// minority names written in Han characters (U+00B7, U+30FB, U+2022, U+FF0E).
fn separator(c: char) -> bool {
    c.is_whitespace() || matches!(c, '·' | '・' | '•' | '．')
}

/// Characters of scripts written without spaces, where each character is a
/// syllable: masked like Han names.
fn syllabic(c: char) -> bool {
    matches!(c,
        '\u{3400}'..='\u{4DBF}'   // CJK extension A
        | '\u{4E00}'..='\u{9FFF}' // CJK unified ideographs
        | '\u{F900}'..='\u{FAFF}' // CJK compatibility ideographs
        | '\u{20000}'..='\u{3134F}' // CJK extensions B to G
        | '\u{3040}'..='\u{30FF}' // hiragana, katakana
        | '\u{AC00}'..='\u{D7AF}' // Hangul syllables
    )
}

/// `n` mask characters, at most [`MAX_RUN`].
fn run(n: usize) -> String {
    std::iter::repeat_n(MASK, n.min(MAX_RUN)).collect()
}

/// The masked form of a holder's name, as a code carries it.
pub fn mask_name(raw: &str) -> Result<String, CodeError> {
    let name = raw.trim();
    let count = name.chars().count();
    if count == 0 {
        return Err(CodeError::Name(
            "name is empty: give the holder's name as on the identity card".into(),
        ));
    }
    if count > MAX_NAME_CHARS {
        return Err(CodeError::Name(format!(
            "name is {count} characters, longer than the {MAX_NAME_CHARS} a code accepts: give the name as on the identity card"
        )));
    }
    if let Some(bad) = name.chars().find(|&c| {
        c.is_control()
            || !(c.is_alphabetic() || separator(c) || matches!(c, '\'' | '’' | '-' | '.'))
    }) {
        return Err(CodeError::Name(format!(
            "name contains {bad:?} (U+{:04X}): a name has letters, spaces, middle dots, apostrophes and hyphens only",
            bad as u32
        )));
    }
    let dot = name.chars().find(|&c| separator(c) && !c.is_whitespace());
    let words: Vec<&str> = name.split(separator).filter(|w| !w.is_empty()).collect();
    if let Some(bad) = words.iter().find(|w| !w.starts_with(char::is_alphabetic)) {
        return Err(CodeError::Name(format!(
            "name word {bad:?} does not begin with a letter: give the name as on the identity card"
        )));
    }
    if dot.is_none() && words.iter().all(|w| w.chars().all(syllabic)) {
        // A Han name written with a space (`张 三`) is still one name.
        return Ok(mask_syllabic(&words.concat()));
    }
    let shown: Vec<&str> = if words.len() > SHOWN_WORDS {
        let mut shown = words[..SHOWN_WORDS - 1].to_vec();
        shown.push(words[words.len() - 1]);
        shown
    } else {
        words
    };
    let joiner = match dot {
        Some(d) => d.to_string(),
        None => " ".to_owned(),
    };
    Ok(shown
        .iter()
        .map(|w| {
            let mut chars = w.chars();
            let first = chars.next().expect("words are not empty");
            match chars.count() {
                // A one-syllable word shown would be shown whole.
                0 if syllabic(first) => MASK.to_string(),
                rest => format!("{first}{}", run(rest)),
            }
        })
        .collect::<Vec<_>>()
        .join(&joiner))
}

/// A one-word Han, Hangul or kana name: the surname, and after a single
/// character surname the given name's last character.
fn mask_syllabic(word: &str) -> String {
    let chars: Vec<char> = word.chars().collect();
    if chars.len() == 1 {
        // A one-character name is all surname or all given name: nothing of
        // it can be shown without showing all of it.
        return MASK.to_string();
    }
    let compound = chars.len() >= 3 && COMPOUND_SURNAMES.iter().any(|s| word.starts_with(s));
    let surname = if compound { 2 } else { 1 };
    let given = &chars[surname..];
    let mut masked: String = chars[..surname].iter().collect();
    if compound || given.len() < 2 {
        masked.push_str(&run(given.len()));
    } else {
        masked.push_str(&run(given.len() - 1));
        masked.push(given[given.len() - 1]);
    }
    masked
}

/// The masked form of a national id: first four and last four characters.
pub fn mask_national_id(id: &NationalId) -> String {
    let s = id.as_str();
    format!(
        "{}{}{}",
        &s[..4],
        "*".repeat(s.len() - 8),
        &s[s.len() - 4..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real-world name shapes and how a code shows them.
    #[test]
    fn names_of_every_shape() {
        let table = [
            // Two, three and four character Han names.
            ("张三", "张*"),
            ("王芳", "王*"),
            ("张小三", "张*三"),
            ("李晓明", "李*明"),
            ("张王小明", "张**明"),
            // Compound surnames.
            ("欧阳娜", "欧阳*"),
            ("欧阳娜娜", "欧阳**"),
            ("司马相如", "司马**"),
            ("诸葛亮", "诸葛*"),
            // A two-character name beginning like a compound surname is a
            // one-character surname and a given name.
            ("欧阳", "欧*"),
            // Longer Han names: runs of at most three.
            ("爱新觉罗溥仪", "爱***仪"),
            // Minority names with a middle dot.
            ("买买提·艾力", "买**·艾*"),
            ("阿卜杜热合曼·买买提明", "阿***·买***"),
            ("迪丽热巴・迪力木拉提", "迪***・迪***"),
            // Surrounding spaces are not part of the name, nor are spaces
            // inside a Han name.
            ("  张三 ", "张*"),
            ("张 三", "张*"),
            ("张 小 三", "张*三"),
            ("阿·三", "*·*"),
            // Latin script, with apostrophes and hyphens inside words.
            ("John Smith", "J*** S***"),
            ("Li Na", "L* N*"),
            ("Seán O'Brien", "S*** O***"),
            ("Jean-Luc Picard", "J*** P***"),
            ("Madonna", "M***"),
            ("Maria del Carmen Garcia Lopez", "M*** d** L***"),
            // Other scripts.
            ("Анна Каренина", "А*** К***"),
            ("김민준", "김*준"),
            ("さくら", "さ*ら"),
            ("Nguyễn Văn An", "N*** V** A*"),
            // A one-character name.
            ("张", "*"),
        ];
        for (name, masked) in table {
            assert_eq!(mask_name(name).unwrap(), masked, "{name}");
        }
    }

    #[test]
    fn masked_names_stay_short() {
        let longest = [
            "𠀀𠀁𠀂𠀃𠀄𠀅 𠀀𠀁𠀂𠀃𠀄𠀅 𠀀𠀁𠀂𠀃𠀄𠀅 𠀀𠀁𠀂𠀃𠀄𠀅",
            "𠀀𠀁𠀂𠀃𠀄𠀅·𠀀𠀁𠀂𠀃𠀄𠀅·𠀀𠀁𠀂𠀃𠀄𠀅·𠀀𠀁𠀂𠀃𠀄𠀅",
            &"a".repeat(MAX_NAME_CHARS),
        ];
        for name in longest {
            let masked = mask_name(name).unwrap();
            assert!(masked.len() <= 25, "{masked:?} is {} bytes", masked.len());
        }
    }

    #[test]
    fn bad_names_are_refused_with_a_reason() {
        for (name, says) in [
            ("", "empty"),
            ("   ", "empty"),
            ("张\n三", "U+000A"),
            ("张\"三", "U+0022"),
            ("R2D2", "U+0032"),
            ("- Smith", "does not begin with a letter"),
        ] {
            let err = mask_name(name).unwrap_err().to_string();
            assert!(err.contains(says), "{name:?}: {err}");
        }
        let long = "a".repeat(MAX_NAME_CHARS + 1);
        assert!(
            mask_name(&long)
                .unwrap_err()
                .to_string()
                .contains("longer than")
        );
    }

    #[test]
    fn national_ids_keep_four_and_four() {
        for (id, masked) in [
            ("11010519491231002X", "1101**********002X"),
            ("11010519491231002x", "1101**********002X"),
            ("440106199003077430", "4401**********7430"),
        ] {
            let id = NationalId::parse(id).unwrap();
            assert_eq!(mask_national_id(&id), masked);
        }
    }
}
