//! Everything between provinces: holder pseudonyms, signed health codes and
//! their verification, and (as the federation grows) the trust list, peer
//! clients and status-change feeds.

pub mod codes;
pub mod holder;
