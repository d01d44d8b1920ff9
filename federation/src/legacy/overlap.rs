//! Whether two formats can match the same text, decided exactly: each
//! format's whole-text pattern becomes a DFA (anchored, every match kept),
//! and a breadth-first walk of the pair of DFAs looks for a text that takes
//! both to a match at its end. The walk is bounded; a pattern too complex
//! to check is refused like an overlap, with its own message.

use std::collections::{HashMap, VecDeque};

use regex_automata::dfa::{Automaton, StartKind, dense};
use regex_automata::util::primitives::StateID;
use regex_automata::util::start;
use regex_automata::{Anchored, MatchKind};

use super::format::{HUFU_CODES, LegacyFormat};
use crate::trust::{TrustError, TrustList};

/// Bound on one DFA's size: determinising a pattern such as `(a|b)*a(a|b){20}`
/// explodes, and is refused instead.
const DFA_SIZE_LIMIT: usize = 2 * 1024 * 1024;
/// Most pairs of states one overlap check visits.
const MAX_PAIRS: usize = 100_000;

type Dfa = dense::DFA<Vec<u32>>;

/// A state of the walk: one state of each DFA.
type Pair = (StateID, StateID);
/// How the walk reached each pair: from which pair, on which byte.
type Parents = HashMap<Pair, Option<(Pair, u8)>>;

fn dfa(pattern: &str) -> Result<Dfa, String> {
    dense::Builder::new()
        .configure(
            dense::Config::new()
                .match_kind(MatchKind::All)
                .start_kind(StartKind::Anchored)
                .dfa_size_limit(Some(DFA_SIZE_LIMIT))
                .determinize_size_limit(Some(DFA_SIZE_LIMIT))
                .accelerate(false),
        )
        .build(pattern)
        .map_err(|e| {
            format!("too complex to check for overlaps ({e}): describe the code more simply")
        })
}

/// A format of a member, with what the messages call it.
struct Named {
    label: String,
    max_len: usize,
    dfa: Dfa,
}

/// Refuses a list whose members' formats could match the same text as
/// another format (of any member) or as Hufu's own codes.
pub(crate) fn check_formats(list: &TrustList) -> Result<(), TrustError> {
    // Each member's formats compile and are few: Member::validate.
    let mut all = Vec::new();
    for m in &list.members {
        for f in &m.legacy_formats {
            all.push(named(m.province.to_string(), f).map_err(|reason| {
                TrustError::InvalidMember {
                    province: m.province,
                    reason,
                }
            })?);
        }
    }
    if all.is_empty() {
        return Ok(());
    }
    let hufu = Named {
        label: "Hufu's own codes".into(),
        max_len: usize::MAX,
        dfa: dfa(HUFU_CODES).expect("a fixed pattern"),
    };
    for (i, a) in all.iter().enumerate() {
        for b in all[..i].iter().chain(std::iter::once(&hufu)) {
            if let Some(text) = common_text(a, b)? {
                return Err(TrustError::FormatOverlap {
                    a: a.label.clone(),
                    b: b.label.clone(),
                    example: text,
                });
            }
        }
    }
    Ok(())
}

fn named(province: String, f: &LegacyFormat) -> Result<Named, String> {
    Ok(Named {
        label: format!("{province}/{}", f.name),
        max_len: f.max_len,
        dfa: dfa(&f.full_pattern()).map_err(|e| format!("format {}: {e}", f.name))?,
    })
}

/// The shortest text both formats match within their length bounds, if any.
fn common_text(a: &Named, b: &Named) -> Result<Option<String>, TrustError> {
    let too_complex = || TrustError::FormatOverlap {
        a: a.label.clone(),
        b: b.label.clone(),
        example: "(too complex to decide: describe the codes more simply)".into(),
    };
    let anchored = start::Config::new().anchored(Anchored::Yes);
    let (Ok(sa), Ok(sb)) = (a.dfa.start_state(&anchored), b.dfa.start_state(&anchored)) else {
        return Err(too_complex());
    };
    // Bytes at which either DFA's equivalence classes change: one
    // representative of each joint class is enough to walk every path.
    let (ca, cb) = (a.dfa.byte_classes(), b.dfa.byte_classes());
    let bytes: Vec<u8> = (0..=255u8)
        .filter(|&x| x == 0 || ca.get(x) != ca.get(x - 1) || cb.get(x) != cb.get(x - 1))
        .collect();
    // Breadth first, so the first text found is a shortest one.
    let mut parent: Parents = HashMap::from([((sa, sb), None)]);
    let mut queue = VecDeque::from([((sa, sb), 0usize)]);
    let bound = a.max_len.min(b.max_len);
    while let Some(((x, y), depth)) = queue.pop_front() {
        if a.dfa.is_match_state(a.dfa.next_eoi_state(x))
            && b.dfa.is_match_state(b.dfa.next_eoi_state(y))
        {
            return Ok(Some(witness(&parent, (x, y))));
        }
        if depth >= bound {
            continue;
        }
        for &byte in &bytes {
            let (nx, ny) = (a.dfa.next_state(x, byte), b.dfa.next_state(y, byte));
            if a.dfa.is_dead_state(nx) || b.dfa.is_dead_state(ny) {
                continue;
            }
            if a.dfa.is_quit_state(nx) || b.dfa.is_quit_state(ny) {
                return Err(too_complex());
            }
            if parent.contains_key(&(nx, ny)) {
                continue;
            }
            if parent.len() >= MAX_PAIRS {
                return Err(too_complex());
            }
            parent.insert((nx, ny), Some(((x, y), byte)));
            queue.push_back(((nx, ny), depth + 1));
        }
    }
    Ok(None)
}

fn witness(parent: &Parents, mut at: Pair) -> String {
    let mut bytes = Vec::new();
    while let Some(Some((from, byte))) = parent.get(&at) {
        bytes.push(*byte);
        at = *from;
    }
    bytes.reverse();
    String::from_utf8_lossy(&bytes).into_owned()
}
