//! A connection's last lookup. The requests of a keep-alive connection come from one client
//! (or from the few behind one trusted hop), and a database lookup costs more than the rest
//! of the routing decision; the memo answers a repeat from the last answer. It is keyed by
//! the chain as well as the address, so a reload that opens other files is never answered
//! from the old ones.

use std::net::IpAddr;
use std::sync::Mutex;

use super::{GeoDb, Locate, Located};

/// The last address one connection's requests were located from, and where it is.
#[derive(Debug, Default)]
pub struct LocateMemo(Mutex<Option<Remembered>>);

#[derive(Debug, Clone, Copy)]
struct Remembered {
    chain: u64,
    ip: IpAddr,
    located: Located,
}

impl LocateMemo {
    /// `db.locate(ip)`, from the memo when the last lookup was the same.
    pub fn locate(&self, db: &GeoDb, ip: IpAddr) -> Located {
        let chain = db.id();
        // A poisoned memo is only a missed shortcut.
        let last = self.0.lock().ok().and_then(|m| *m);
        if let Some(last) = last.filter(|r| r.chain == chain && r.ip == ip) {
            return last.located;
        }
        let located = db.locate(ip);
        if let Ok(mut m) = self.0.lock() {
            *m = Some(Remembered { chain, ip, located });
        }
        located
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geo::Chain;

    const GB: &str = "81.2.69.142";
    const US: &str = "8.8.8.8";

    #[test]
    fn the_memo_answers_what_the_chain_answers() -> crate::test_fixtures::TestResult {
        let db = GeoDb::embedded();
        let memo = LocateMemo::default();
        for ip in [GB, GB, US, GB, "10.0.0.1", "10.0.0.1", US] {
            let ip: IpAddr = ip.parse()?;
            assert_eq!(memo.locate(&db, ip), db.locate(ip), "{ip}");
        }
        Ok(())
    }

    #[test]
    fn another_chain_is_asked_again() -> crate::test_fixtures::TestResult {
        let ip: IpAddr = GB.parse()?;
        let with_embedded = GeoDb::embedded();
        let empty = GeoDb::load(
            Chain {
                databases: &[],
                embedded_fallback: false,
                max_accuracy_radius_km: 100,
            },
            None,
        )?;
        let memo = LocateMemo::default();
        assert!(memo.locate(&with_embedded, ip).country().is_some());
        // The same address, after a reload to a chain that knows nothing of it.
        assert_eq!(memo.locate(&empty, ip), empty.locate(ip));
        assert!(memo.locate(&empty, ip).country().is_none());
        Ok(())
    }
}
