//! The cron schedule and tick identity.
//!
//! A tick is named by its cron slot: the scheduled fire time, UTC, whole seconds, computed
//! on the replica that fires it. Replicas whose clocks differ by less than half the gap
//! between fire times compute the same slot for the same scheduled tick, which is what
//! lets `scrape_state` record "newest tick scraped" and refuse a second scrape of it.

use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use croner::parser::{CronParser, Seconds};
use croner::Cron;

/// How many upcoming gaps are inspected to find the shortest one.
const GAPS_INSPECTED: usize = 512;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("schedule {0:?} has {1} fields; write 6 (seconds minutes hours day-of-month month day-of-week), e.g. \"*/10 * * * * *\"")]
    FieldCount(String, usize),
    #[error("schedule {0:?} is not a valid cron expression: {1}")]
    Invalid(String, String),
    #[error("schedule {0:?} never fires")]
    NeverFires(String),
}

/// A parsed six-field cron schedule, parsed exactly as the scheduler parses it.
#[derive(Clone, Debug)]
pub struct Schedule {
    text: String,
    cron: Cron,
    min_gap: Duration,
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Schedule, ScheduleError> {
        let fields = text.split_whitespace().count();
        if fields != 6 {
            return Err(ScheduleError::FieldCount(text.to_string(), fields));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Required)
            .dom_and_dow(true)
            .build()
            .parse(text)
            .map_err(|e| ScheduleError::Invalid(text.to_string(), e.to_string()))?;
        let min_gap = shortest_gap(&cron, Utc::now())
            .ok_or_else(|| ScheduleError::NeverFires(text.to_string()))?;
        Ok(Schedule {
            text: text.to_string(),
            cron,
            min_gap,
        })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// The shortest gap between consecutive fire times: the default lease, and "one
    /// interval" wherever the design speaks of it.
    pub fn interval(&self) -> Duration {
        self.min_gap
    }

    /// The slot of the tick firing at `now`: the newest fire time at or before `now`.
    pub fn slot_at(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let now = now.trunc_subsecs(0);
        self.cron
            .find_previous_occurrence(&now, true)
            .map(|t| t.trunc_subsecs(0))
            // A schedule that parsed and fires in the future also fired in the past
            // for any realistic `now`; if the search fails, name the second itself.
            .unwrap_or(now)
    }

    /// The next fire time strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&after, false).ok()
    }
}

fn shortest_gap(cron: &Cron, from: DateTime<Utc>) -> Option<Duration> {
    let mut prev = cron.find_next_occurrence(&from, false).ok()?;
    let mut best: Option<Duration> = None;
    for _ in 0..GAPS_INSPECTED {
        let Ok(next) = cron.find_next_occurrence(&prev, false) else {
            break;
        };
        if let Ok(gap) = (next - prev).to_std() {
            best = Some(best.map_or(gap, |b| b.min(gap)));
        }
        prev = next;
    }
    best
}

/// Formats a tick id: RFC 3339, UTC, whole seconds, `Z` suffix.
pub fn tick_id(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn every_ten_seconds_has_a_ten_second_interval() {
        let s = Schedule::parse("*/10 * * * * *").unwrap();
        assert_eq!(s.interval(), Duration::from_secs(10));
    }

    #[test]
    fn irregular_schedule_uses_the_shortest_gap() {
        let s = Schedule::parse("0,5,30 * * * * *").unwrap();
        assert_eq!(s.interval(), Duration::from_secs(5));
    }

    #[test]
    fn five_field_cron_is_rejected_with_the_field_count() {
        let err = Schedule::parse("*/5 * * * *").unwrap_err();
        assert_eq!(err, ScheduleError::FieldCount("*/5 * * * *".into(), 5));
        assert!(err.to_string().contains("write 6"));
    }

    #[test]
    fn garbage_cron_is_rejected() {
        assert!(matches!(
            Schedule::parse("a b c d e f"),
            Err(ScheduleError::Invalid(..))
        ));
    }

    #[test]
    fn slot_is_the_fire_time_at_or_before_now() {
        let s = Schedule::parse("*/10 * * * * *").unwrap();
        let at = |sec, ms| {
            Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, sec).unwrap()
                + chrono::Duration::milliseconds(ms)
        };
        assert_eq!(s.slot_at(at(20, 0)), at(20, 0));
        assert_eq!(s.slot_at(at(20, 900)), at(20, 0));
        assert_eq!(s.slot_at(at(23, 300)), at(20, 0));
        assert_eq!(s.slot_at(at(29, 999)), at(20, 0));
        assert_eq!(tick_id(s.slot_at(at(29, 999))), "2026-01-02T03:04:20Z");
    }

    #[test]
    fn skewed_replicas_agree_on_the_slot() {
        // Two replicas firing for the 03:04:20 tick with clocks 0.6 s apart (a third of a
        // 2 s interval at most) compute the same slot.
        let s = Schedule::parse("*/2 * * * * *").unwrap();
        let base = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 20).unwrap();
        let ahead = base + chrono::Duration::milliseconds(50);
        let behind = base + chrono::Duration::milliseconds(650);
        assert_eq!(s.slot_at(ahead), s.slot_at(behind));
    }
}
