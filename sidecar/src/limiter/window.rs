//! Quota window arithmetic: where a day/week/month period ends, in UTC.
//!
//! Kept separate from the limiter so the calendar rules (month ends, leap years, Monday-based
//! weeks) are unit-tested on their own.

use chrono::{DateTime, Datelike, Months, NaiveDate};
use keylimit_dataplane::{QuotaAlignment, QuotaPeriod};

use super::clock::NANOS_PER_SEC;

const MINUTE: u64 = 60;
const HOUR: u64 = 3_600;
const DAY: u64 = 86_400;
const WEEK: u64 = 7 * DAY;
/// 1970-01-01 was a Thursday; the first Monday 00:00 UTC is four days later.
const FIRST_MONDAY: u64 = 4 * DAY;

/// Nominal length in seconds, for the `w` parameter of `RateLimit-Policy` (a month is
/// reported as 30 days; the real boundary comes from [`window_end_ns`]).
pub fn nominal_secs(period: QuotaPeriod) -> u64 {
    match period {
        QuotaPeriod::Minute => MINUTE,
        QuotaPeriod::Hour => HOUR,
        QuotaPeriod::Day => DAY,
        QuotaPeriod::Week => WEEK,
        QuotaPeriod::Month => 30 * DAY,
    }
}

/// End (exclusive, ns since the epoch) of the window a request at `now_ns` opens. Calendar
/// windows end at the next UTC boundary; rolling windows end one period after `now_ns`.
pub fn window_end_ns(period: QuotaPeriod, alignment: QuotaAlignment, now_ns: u64) -> u64 {
    let secs = now_ns / NANOS_PER_SEC;
    match alignment {
        QuotaAlignment::Calendar => calendar_end_secs(period, secs).saturating_mul(NANOS_PER_SEC),
        QuotaAlignment::Rolling => {
            let sub = now_ns % NANOS_PER_SEC;
            let end = match period {
                QuotaPeriod::Month => add_month_secs(secs),
                other => secs.saturating_add(nominal_secs(other)),
            };
            end.saturating_mul(NANOS_PER_SEC).saturating_add(sub)
        }
    }
}

/// First second of the next calendar period after the one containing `secs`.
pub fn calendar_end_secs(period: QuotaPeriod, secs: u64) -> u64 {
    match period {
        QuotaPeriod::Minute => (secs / MINUTE + 1) * MINUTE,
        QuotaPeriod::Hour => (secs / HOUR + 1) * HOUR,
        QuotaPeriod::Day => (secs / DAY + 1) * DAY,
        QuotaPeriod::Week => {
            if secs < FIRST_MONDAY {
                FIRST_MONDAY
            } else {
                FIRST_MONDAY + ((secs - FIRST_MONDAY) / WEEK + 1) * WEEK
            }
        }
        QuotaPeriod::Month => next_month_start_secs(secs),
    }
}

fn next_month_start_secs(secs: u64) -> u64 {
    let Some(dt) = i64::try_from(secs)
        .ok()
        .and_then(|s| DateTime::from_timestamp(s, 0))
    else {
        return u64::MAX;
    };
    let (year, month) = if dt.month() == 12 {
        (dt.year() + 1, 1)
    } else {
        (dt.year(), dt.month() + 1)
    };
    NaiveDate::from_ymd_opt(year, month, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .and_then(|d| u64::try_from(d.and_utc().timestamp()).ok())
        .unwrap_or(u64::MAX)
}

/// Same time one calendar month later, clamped to the month's last day (Jan 31 -> Feb 28/29).
fn add_month_secs(secs: u64) -> u64 {
    i64::try_from(secs)
        .ok()
        .and_then(|s| DateTime::from_timestamp(s, 0))
        .and_then(|dt| dt.checked_add_months(Months::new(1)))
        .and_then(|dt| u64::try_from(dt.timestamp()).ok())
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn ts(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> u64 {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s)
            .unwrap()
            .timestamp() as u64
    }

    #[test]
    fn day_and_hour_boundaries() {
        assert_eq!(
            calendar_end_secs(QuotaPeriod::Day, ts(2026, 3, 1, 23, 59, 59)),
            ts(2026, 3, 2, 0, 0, 0)
        );
        assert_eq!(
            calendar_end_secs(QuotaPeriod::Day, ts(2026, 3, 2, 0, 0, 0)),
            ts(2026, 3, 3, 0, 0, 0)
        );
        assert_eq!(
            calendar_end_secs(QuotaPeriod::Hour, ts(2026, 3, 2, 5, 0, 0)),
            ts(2026, 3, 2, 6, 0, 0)
        );
    }

    #[test]
    fn weeks_start_on_monday() {
        // 2026-11-29 is a Sunday; the week ends at Monday 2026-11-30 00:00.
        assert_eq!(
            calendar_end_secs(QuotaPeriod::Week, ts(2026, 11, 29, 23, 59, 59)),
            ts(2026, 11, 30, 0, 0, 0)
        );
        assert_eq!(
            calendar_end_secs(QuotaPeriod::Week, ts(2026, 11, 30, 0, 0, 0)),
            ts(2026, 12, 7, 0, 0, 0)
        );
    }

    #[test]
    fn month_ends_including_leap_february_and_year_end() {
        assert_eq!(
            calendar_end_secs(QuotaPeriod::Month, ts(2028, 2, 29, 23, 59, 59)),
            ts(2028, 3, 1, 0, 0, 0)
        );
        assert_eq!(
            calendar_end_secs(QuotaPeriod::Month, ts(2027, 2, 28, 12, 0, 0)),
            ts(2027, 3, 1, 0, 0, 0)
        );
        assert_eq!(
            calendar_end_secs(QuotaPeriod::Month, ts(2026, 12, 31, 23, 59, 59)),
            ts(2027, 1, 1, 0, 0, 0)
        );
        assert_eq!(
            calendar_end_secs(QuotaPeriod::Month, ts(2026, 1, 1, 0, 0, 0)),
            ts(2026, 2, 1, 0, 0, 0)
        );
    }

    #[test]
    fn rolling_month_clamps_to_month_end() {
        let start = ts(2026, 1, 31, 10, 0, 0) * NANOS_PER_SEC;
        assert_eq!(
            window_end_ns(QuotaPeriod::Month, QuotaAlignment::Rolling, start),
            ts(2026, 2, 28, 10, 0, 0) * NANOS_PER_SEC
        );
        let day = window_end_ns(QuotaPeriod::Day, QuotaAlignment::Rolling, start + 5);
        assert_eq!(day, start + DAY * NANOS_PER_SEC + 5);
    }
}
