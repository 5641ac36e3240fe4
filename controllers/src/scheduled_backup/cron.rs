//! Cron schedules with five fields (minute hour day-of-month month day-of-week, UTC) or a macro
//! (`@hourly`, `@daily`, ...): parsing and the next time a schedule fires. Pure.

use k8s_openapi::jiff::{Timestamp, ToSpan, tz::TimeZone};

/// A parsed schedule: the allowed values of each field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    minutes: Vec<bool>,
    hours: Vec<bool>,
    days: Vec<bool>,
    months: Vec<bool>,
    weekdays: Vec<bool>,
    /// Both day fields restricted: a day matches either (as cron does).
    day_or_weekday: bool,
}

const MONTHS: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const WEEKDAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

fn value(text: &str, names: &[&str], offset: u32) -> Result<u32, String> {
    if let Some(index) = names
        .iter()
        .position(|name| name.eq_ignore_ascii_case(text))
    {
        return Ok(index as u32 + offset);
    }
    text.parse()
        .map_err(|_| format!("{text:?} is not a number"))
}

fn field(
    text: &str,
    min: u32,
    max: u32,
    names: &[&str],
    offset: u32,
) -> Result<(Vec<bool>, bool), String> {
    let mut allowed = vec![false; max as usize + 1];
    let restricted = text != "*" && text != "?";
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((range, step)) => (
                range,
                step.parse::<u32>()
                    .map_err(|_| format!("bad step in {part:?}"))?,
            ),
            None => (part, 1),
        };
        if step == 0 {
            return Err(format!("step 0 in {part:?}"));
        }
        let (low, high) = if range == "*" || range == "?" {
            (min, max)
        } else if let Some((low, high)) = range.split_once('-') {
            (value(low, names, offset)?, value(high, names, offset)?)
        } else {
            let single = value(range, names, offset)?;
            (single, if part.contains('/') { max } else { single })
        };
        // Sunday may be written 7.
        let high = if max == 6 && high == 7 { 6 } else { high };
        let low = if max == 6 && low == 7 { 0 } else { low };
        if low < min || high > max || low > high {
            return Err(format!("{part:?} is outside {min}-{max}"));
        }
        for v in (low..=high).step_by(step as usize) {
            allowed[v as usize] = true;
        }
    }
    Ok((allowed, restricted))
}

impl Schedule {
    /// Parses a five-field expression or a macro.
    pub fn parse(text: &str) -> Result<Self, String> {
        let expanded = match text.trim() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(
                "a schedule has five fields (minute hour day-of-month month day-of-week)".into(),
            );
        }
        let (minutes, _) = field(fields[0], 0, 59, &[], 0)?;
        let (hours, _) = field(fields[1], 0, 23, &[], 0)?;
        let (days, days_restricted) = field(fields[2], 1, 31, &[], 0)?;
        let (months, _) = field(fields[3], 1, 12, &MONTHS, 1)?;
        let (weekdays, weekdays_restricted) = field(fields[4], 0, 6, &WEEKDAYS, 0)?;
        Ok(Self {
            minutes,
            hours,
            days,
            months,
            weekdays,
            day_or_weekday: days_restricted && weekdays_restricted,
        })
    }

    /// The first time strictly after `after` (to the minute, UTC) the schedule fires; `None` if
    /// it never does within five years (such as `0 0 31 2 *`).
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        let zoned = after.to_zoned(TimeZone::UTC);
        let mut time = zoned
            .datetime()
            .with()
            .second(0)
            .subsec_nanosecond(0)
            .build()
            .ok()?
            .checked_add(1.minute())
            .ok()?;
        for _ in 0..(5 * 366 * 24 * 60) {
            let day_matches = {
                let day = self.days[time.day() as usize];
                let weekday = self.weekdays[time.weekday().to_sunday_zero_offset() as usize];
                if self.day_or_weekday {
                    day || weekday
                } else {
                    day && weekday
                }
            };
            if !self.months[time.month() as usize] || !day_matches {
                time = time
                    .date()
                    .tomorrow()
                    .ok()?
                    .to_datetime(k8s_openapi::jiff::civil::Time::midnight());
                continue;
            }
            if !self.hours[time.hour() as usize] {
                time = time
                    .with()
                    .minute(0)
                    .build()
                    .ok()?
                    .checked_add(1.hour())
                    .ok()?;
                continue;
            }
            if self.minutes[time.minute() as usize] {
                return time
                    .to_zoned(TimeZone::UTC)
                    .ok()
                    .map(|zoned| zoned.timestamp());
            }
            time = time.checked_add(1.minute()).ok()?;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn next_times() {
        let daily = Schedule::parse("0 3 * * *").unwrap();
        assert_eq!(
            daily.next_after(at("2026-12-04T04:10:00Z")),
            Some(at("2026-12-05T03:00:00Z"))
        );
        assert_eq!(
            daily.next_after(at("2026-12-04T02:59:30Z")),
            Some(at("2026-12-04T03:00:00Z"))
        );
        let every_minute = Schedule::parse("* * * * *").unwrap();
        assert_eq!(
            every_minute.next_after(at("2026-12-04T04:10:20Z")),
            Some(at("2026-12-04T04:11:00Z"))
        );
        let quarter = Schedule::parse("*/15 9-17 * * MON-FRI").unwrap();
        // 2026-12-05 is a Saturday.
        assert_eq!(
            quarter.next_after(at("2026-12-04T17:50:00Z")),
            Some(at("2026-12-07T09:00:00Z"))
        );
        assert_eq!(
            Schedule::parse("@hourly")
                .unwrap()
                .next_after(at("2026-12-04T04:10:00Z")),
            Some(at("2026-12-04T05:00:00Z"))
        );
        assert_eq!(
            Schedule::parse("0 0 31 2 *")
                .unwrap()
                .next_after(at("2026-12-04T04:10:00Z")),
            None
        );
    }

    #[test]
    fn bad_schedules_are_refused() {
        assert!(Schedule::parse("0 3 * *").is_err());
        assert!(Schedule::parse("61 * * * *").is_err());
        assert!(Schedule::parse("*/0 * * * *").is_err());
    }
}
