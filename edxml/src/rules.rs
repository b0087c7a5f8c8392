//! Field rules of DESIGN §9 / QCVN 102:2016, shared by documents and status messages.
//!
//! Invariant: every check names the edXML path it was given; values in errors are
//! shortened with [`shorten`]. Agency codes are checked with
//! `lienthong_proto::agency::is_valid_agency_code`, document ids are built with
//! `lienthong_proto::document::business_id`: the same rules as the signed header.

use lienthong_proto::agency::is_valid_agency_code;

use crate::error::{EdxmlError, shorten};

/// Length in characters (not bytes), as the standard counts.
pub(crate) fn max_chars(path: &str, value: &str, max: usize) -> Result<(), EdxmlError> {
    no_control(path, value)?;
    let got = value.chars().count();
    if got > max {
        return Err(EdxmlError::TooLong {
            path: path.into(),
            max,
            got,
        });
    }
    Ok(())
}

/// No control characters other than tab, line feed and carriage return: they cannot be
/// written in XML 1.0 and have no place in a header field.
pub(crate) fn no_control(path: &str, value: &str) -> Result<(), EdxmlError> {
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\r' && c != '\t')
    {
        return Err(EdxmlError::ControlCharacter { path: path.into() });
    }
    Ok(())
}

/// A field the signed header shows on one line (its `one_line` rule): [`max_chars`],
/// and no line break, tab, or line or paragraph separator either.
pub(crate) fn one_line(path: &str, value: &str, max: usize) -> Result<(), EdxmlError> {
    max_chars(path, value, max)?;
    if value
        .chars()
        .any(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))
    {
        return Err(EdxmlError::NotOneLine { path: path.into() });
    }
    Ok(())
}

/// [`one_line`], and not empty.
pub(crate) fn required_one_line(path: &str, value: &str, max: usize) -> Result<(), EdxmlError> {
    if value.trim().is_empty() {
        return Err(EdxmlError::EmptyValue { path: path.into() });
    }
    one_line(path, value, max)
}

pub(crate) fn required_chars(path: &str, value: &str, max: usize) -> Result<(), EdxmlError> {
    if value.trim().is_empty() {
        return Err(EdxmlError::EmptyValue { path: path.into() });
    }
    max_chars(path, value, max)
}

pub(crate) fn agency(path: &str, value: &str) -> Result<(), EdxmlError> {
    if is_valid_agency_code(value) {
        Ok(())
    } else {
        Err(EdxmlError::InvalidAgencyCode {
            path: path.into(),
            value: shorten(value),
        })
    }
}

// `is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
#[allow(clippy::manual_is_multiple_of)]
fn is_leap(year: u32) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn digits(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// True for a real calendar date written `yyyy/MM/dd` (year 0001..9999).
pub fn is_valid_date(date: &str) -> bool {
    let b = date.as_bytes();
    if b.len() != 10 || b[4] != b'/' || b[7] != b'/' {
        return false;
    }
    let (Some(y), Some(m), Some(d)) = (
        digits(date.get(0..4).unwrap_or("")),
        digits(date.get(5..7).unwrap_or("")),
        digits(date.get(8..10).unwrap_or("")),
    ) else {
        return false;
    };
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(y) => 29,
        2 => 28,
        _ => return false,
    };
    y >= 1 && d >= 1 && d <= days
}

/// True for `yyyy/MM/dd HH:mm:ss` with a real date and a time of day.
pub fn is_valid_timestamp(value: &str) -> bool {
    let b = value.as_bytes();
    if b.len() != 19 || b[10] != b' ' || b[13] != b':' || b[16] != b':' {
        return false;
    }
    let (Some(date), Some(h), Some(m), Some(s)) = (
        value.get(0..10),
        value.get(11..13).and_then(digits),
        value.get(14..16).and_then(digits),
        value.get(17..19).and_then(digits),
    ) else {
        return false;
    };
    is_valid_date(date) && h < 24 && m < 60 && s < 60
}

/// A status `Timestamp` in the written form `yyyy/MM/dd HH:mm:ss`, from the forms
/// producers send: that form itself; `dd/MM/yyyy HH:mm:ss` (a legacy SOAP connector,
/// Vietnamese day-first order); and ISO 8601 `yyyy-MM-ddTHH:mm:ss` with optional
/// fraction of a second, without an offset or with `+07:00` (Vietnam time, what Java
/// SDKs marshal a `Date` to). `None` for anything else, an offset other than Vietnam
/// time included (it would change the wall-clock time the status shows).
pub fn normalise_timestamp(value: &str) -> Option<String> {
    if is_valid_timestamp(value) {
        return Some(value.to_owned());
    }
    let b = value.as_bytes();
    if b.len() == 19 && b[2] == b'/' && b[5] == b'/' && b[10] == b' ' {
        let (day, month, year, time) = (
            value.get(0..2)?,
            value.get(3..5)?,
            value.get(6..10)?,
            value.get(11..19)?,
        );
        let written = format!("{year}/{month}/{day} {time}");
        return is_valid_timestamp(&written).then_some(written);
    }
    if b.len() >= 19 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T' {
        let rest = value.get(19..)?;
        let rest = match rest.strip_prefix('.') {
            Some(fraction) => {
                let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
                if digits == 0 {
                    return None;
                }
                fraction.get(digits..)?
            }
            None => rest,
        };
        if !(rest.is_empty() || rest == "+07:00") {
            return None;
        }
        let written = format!(
            "{}/{}/{} {}",
            value.get(0..4)?,
            value.get(5..7)?,
            value.get(8..10)?,
            value.get(11..19)?
        );
        return is_valid_timestamp(&written).then_some(written);
    }
    None
}

/// A status code in its written two-digit form: `"1"` (an SDK that keeps the code
/// as an integer) becomes `"01"`; anything else is returned unchanged.
pub fn normalise_status_code(value: &str) -> String {
    if value.len() == 1 && value.bytes().all(|b| b.is_ascii_digit()) {
        format!("0{value}")
    } else {
        value.to_owned()
    }
}

pub(crate) fn date(path: &str, value: &str) -> Result<(), EdxmlError> {
    if is_valid_date(value) {
        Ok(())
    } else {
        Err(EdxmlError::InvalidDate {
            path: path.into(),
            value: shorten(value),
        })
    }
}

pub(crate) fn timestamp(path: &str, value: &str) -> Result<(), EdxmlError> {
    if is_valid_timestamp(value) {
        Ok(())
    } else {
        Err(EdxmlError::InvalidTimestamp {
            path: path.into(),
            value: shorten(value),
        })
    }
}

/// Parses an unsigned integer in `min..=max`.
pub(crate) fn number(path: &str, value: &str, min: u32, max: u32) -> Result<u32, EdxmlError> {
    match digits(value) {
        Some(n) if (min..=max).contains(&n) && value.len() <= 10 => Ok(n),
        _ => Err(EdxmlError::OutOfRange {
            path: path.into(),
            min,
            max,
            value: shorten(value),
        }),
    }
}

pub(crate) fn in_range(path: &str, value: u32, min: u32, max: u32) -> Result<(), EdxmlError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(EdxmlError::OutOfRange {
            path: path.into(),
            min,
            max,
            value: value.to_string(),
        })
    }
}

/// The parts of a document id `{OrganId},{yyyy/MM/dd},{CodeNumber}/{CodeNotation}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentIdParts<'a> {
    pub organ_id: &'a str,
    pub date: &'a str,
    pub number: &'a str,
    pub notation: &'a str,
}

/// Splits a document id; `None` when it does not have the form, the agency code or the
/// date is invalid, or the number is empty. The number is what precedes the first `/`
/// of the third part: a notation may itself contain `/` (e.g. `QĐ-UBND/TB`).
pub fn split_document_id(value: &str) -> Option<DocumentIdParts<'_>> {
    let mut parts = value.splitn(3, ',');
    let (organ_id, date, code) = (parts.next()?, parts.next()?, parts.next()?);
    let (number, notation) = code.split_once('/')?;
    if !is_valid_agency_code(organ_id) || !is_valid_date(date) || number.is_empty() {
        return None;
    }
    Some(DocumentIdParts {
        organ_id,
        date,
        number,
        notation,
    })
}

pub(crate) fn document_id<'a>(
    path: &str,
    value: &'a str,
) -> Result<DocumentIdParts<'a>, EdxmlError> {
    no_control(path, value)?;
    split_document_id(value).ok_or_else(|| EdxmlError::InvalidDocumentId {
        path: path.into(),
        value: shorten(value),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_real_calendar_dates() {
        for ok in ["2024/02/29", "2026/12/31", "2000/02/29", "0001/01/01"] {
            assert!(is_valid_date(ok), "{ok}");
        }
        for bad in [
            "2023/02/29",
            "1900/02/29",
            "2026/13/01",
            "2026/00/10",
            "2026/04/31",
            "2026-04-01",
            "26/04/2026",
            "2026/4/1",
            "+026/04/01",
            "0000/01/01",
            "",
            "2026/04/01 ",
        ] {
            assert!(!is_valid_date(bad), "{bad}");
        }
    }

    #[test]
    fn timestamps() {
        assert!(is_valid_timestamp("2026/05/01 23:59:59"));
        assert!(!is_valid_timestamp("2026/05/01 24:00:00"));
        assert!(!is_valid_timestamp("01/05/2026 10:00:00"));
        assert!(!is_valid_timestamp("2026/05/01T10:00:00"));
    }

    #[test]
    fn timestamps_are_normalised_from_the_forms_producers_send() {
        for (given, written) in [
            ("2026/05/04 10:30:00", "2026/05/04 10:30:00"),
            ("04/05/2026 10:30:00", "2026/05/04 10:30:00"),
            ("2026-05-04T10:30:00", "2026/05/04 10:30:00"),
            ("2026-05-04T10:30:00.123+07:00", "2026/05/04 10:30:00"),
            ("2026-05-04T10:30:00+07:00", "2026/05/04 10:30:00"),
        ] {
            assert_eq!(
                normalise_timestamp(given).as_deref(),
                Some(written),
                "{given}"
            );
        }
        for bad in [
            "2026-05-04T10:30:00Z",
            "2026-05-04T10:30:00+00:00",
            "2026-05-04T10:30:00.",
            "31/02/2026 10:30:00",
            "04/05/26 10:30",
            "2026/05/04",
            "",
        ] {
            assert_eq!(normalise_timestamp(bad), None, "{bad}");
        }
        assert_eq!(normalise_status_code("1"), "01");
        assert_eq!(normalise_status_code("03"), "03");
        assert_eq!(normalise_status_code("x"), "x");
    }

    #[test]
    fn document_ids() {
        let parts = split_document_id("000.00.00.H31,2026/05/01,12/UBND-VP").unwrap();
        assert_eq!(parts.number, "12");
        assert_eq!(parts.notation, "UBND-VP");
        let parts = split_document_id("000.00.00.H31,2026/05/01,12/QĐ-UBND/TB").unwrap();
        assert_eq!(parts.notation, "QĐ-UBND/TB");
        assert!(split_document_id("000.00.00.H31,2026/05/01,12").is_none());
        assert!(split_document_id("000.00.00.h31,2026/05/01,12/A").is_none());
        assert!(split_document_id("000.00.00.H31,2026/02/30,12/A").is_none());
        assert!(split_document_id("000.00.00.H31,2026/05/01,/A").is_none());
    }
}
