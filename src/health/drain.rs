//! Whether a region is drained: the config's fleet-wide drain and this instance's admin
//! drain combined, decided against the clock (pure).

use std::time::SystemTime;

use crate::config::ConfigDrain;

/// Which drains hold a region out of rotation; either one is enough.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drained {
    /// `[[region]] drain` in the config, in force (no `until`, or `until` still ahead).
    pub config: bool,
    /// `POST /regions/NAME/drain` on this instance.
    pub admin: bool,
}

impl Drained {
    pub(crate) fn any(self) -> bool {
        self.config || self.admin
    }

    /// The sources that drain, as the metric's `source` label and `/status` name them.
    pub(crate) fn sources(self) -> Vec<&'static str> {
        [(self.config, "config"), (self.admin, "admin")]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect()
    }
}

/// A config drain is in force until its `until`; one without `until` until it is removed.
pub(crate) fn config_drain_active(drain: &ConfigDrain, now: SystemTime) -> bool {
    drain.until.is_none_or(|until| now < until)
}

/// The region's drain state at `now`.
pub fn decide(config: Option<&ConfigDrain>, admin: bool, now: SystemTime) -> Drained {
    Drained {
        config: config.is_some_and(|d| config_drain_active(d, now)),
        admin,
    }
}

/// A config drain whose `until` has already passed when the config is loaded: ignored,
/// and worth a warning, since the operator probably meant a later time.
pub fn is_stale(drain: &ConfigDrain, now: SystemTime) -> bool {
    drain.until.is_some() && !config_drain_active(drain, now)
}

/// `until` as an RFC 3339 string (UTC, seconds), for `/status`, `check` and logs.
pub(crate) fn format_until(drain: &ConfigDrain) -> Option<String> {
    drain.until.map(|t| humantime::format_rfc3339_seconds(t).to_string())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn either_drain_drains_and_a_config_drain_ends_at_until() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let drain = |until: Option<SystemTime>| ConfigDrain {
            reason: "maintenance".into(),
            until,
        };
        let open = drain(None);
        let ahead = drain(Some(now + Duration::from_secs(60)));
        let past = drain(Some(now - Duration::from_secs(60)));
        let exactly = drain(Some(now));
        let d = |config, admin| Drained { config, admin };
        let cases = [
            (None, false, d(false, false)),
            (None, true, d(false, true)),
            (Some(&open), false, d(true, false)),
            (Some(&open), true, d(true, true)),
            (Some(&ahead), false, d(true, false)),
            (Some(&past), false, d(false, false)),
            (Some(&past), true, d(false, true)),
            (Some(&exactly), false, d(false, false)),
        ];
        for (config, admin, want) in cases {
            assert_eq!(decide(config, admin, now), want, "{config:?} admin={admin}");
            assert_eq!(decide(config, admin, now).any(), want.config || want.admin);
        }
        assert!(is_stale(&past, now) && is_stale(&exactly, now));
        assert!(!is_stale(&open, now) && !is_stale(&ahead, now));
        assert_eq!(d(true, true).sources(), ["config", "admin"]);
        assert_eq!(d(false, true).sources(), ["admin"]);
        assert!(d(false, false).sources().is_empty());
    }

    #[test]
    fn until_is_shown_in_rfc3339() {
        let d = ConfigDrain {
            reason: "x".into(),
            until: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_133_600)),
        };
        assert_eq!(format_until(&d).as_deref(), Some("2026-12-01T14:00:00Z"));
    }
}
