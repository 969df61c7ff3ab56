//! Wall-clock dates without a time-zone database: UTC civil dates from Unix time (Howard
//! Hinnant's `civil_from_days`), for file names and metadata.

/// `(year, month, day, hour, minute, second, millisecond)` in UTC, now.
pub fn utc_now() -> (i64, i64, i64, i64, i64, i64, u32) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = now.as_secs() as i64;
    let (days, rest) = (seconds.div_euclid(86400), seconds.rem_euclid(86400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (
        year,
        month,
        day,
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        now.subsec_millis(),
    )
}

/// `YYYYMMDD-HHMMSS-mmm` (Musubi's output-name stamp).
pub fn file_stamp() -> String {
    let (year, month, day, hour, minute, second, millisecond) = utc_now();
    format!("{year:04}{month:02}{day:02}-{hour:02}{minute:02}{second:02}-{millisecond:03}")
}

/// `YYYY-MM-DDTHH:MM:SS` (ISO 8601 without a zone, as Musubi's metadata date).
pub fn iso_date() -> String {
    let (year, month, day, hour, minute, second, _) = utc_now();
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_have_their_shapes() {
        let stamp = file_stamp();
        assert_eq!(stamp.len(), 19);
        assert_eq!(&stamp[8..9], "-");
        let iso = iso_date();
        assert_eq!(iso.len(), 19);
        let (year, month, day, ..) = utc_now();
        assert!(year >= 2024 && (1..=12).contains(&month) && (1..=31).contains(&day));
        assert!(iso.starts_with(&format!("{year:04}-{month:02}-{day:02}")));
    }
}
