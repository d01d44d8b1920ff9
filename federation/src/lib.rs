//! Everything between provinces: holder pseudonyms, signed health codes and
//! their verification, signed notes, the trust list, the witnessed audit
//! log, and (as the federation grows) peer clients and status-change feeds.

pub mod audit;
pub mod codes;
pub mod feed;
pub mod holder;
pub mod legacy;
pub mod note;
pub mod snapshot;
pub mod trust;
