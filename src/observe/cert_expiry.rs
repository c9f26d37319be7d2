//! When a certificate expires: `notAfter` read from its DER (pure), for the expiry gauge.
//! Only the few DER elements in front of the validity are walked; nothing is verified.

/// The certificate's `notAfter` as Unix seconds; `None` if the DER is not a certificate.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (cert, _) = element(der, 0x30)?;
    let (tbs, _) = element(cert, 0x30)?;
    let mut rest = tbs;
    // [0] EXPLICIT version, when present.
    if rest.first() == Some(&0xa0) {
        rest = element(rest, 0xa0)?.1;
    }
    rest = element(rest, 0x02)?.1; // serialNumber
    rest = element(rest, 0x30)?.1; // signature algorithm
    rest = element(rest, 0x30)?.1; // issuer
    let (validity, _) = element(rest, 0x30)?;
    let not_before = skip_any(validity)?;
    let tag = *not_before.first()?;
    let (time, _) = element(not_before, tag)?;
    match tag {
        0x17 => utc_time(time, false),
        0x18 => utc_time(time, true),
        _ => None,
    }
}

/// The contents of the element at the start of `der` if its tag is `tag`, and what follows.
fn element(der: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *der.first()? != tag {
        return None;
    }
    let first = *der.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for b in der.get(2..2 + n)? {
            len = len << 8 | usize::from(*b);
        }
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    Some((der.get(header..end)?, der.get(end..)?))
}

fn skip_any(der: &[u8]) -> Option<&[u8]> {
    element(der, *der.first()?).map(|(_, rest)| rest)
}

/// `YYMMDDHHMMSSZ` (UTCTime, years 1950–2049) or `YYYYMMDDHHMMSSZ` (GeneralizedTime).
fn utc_time(s: &[u8], four_digit_year: bool) -> Option<i64> {
    let s = std::str::from_utf8(s).ok()?.strip_suffix('Z')?;
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (year, at) = if four_digit_year {
        (num(0..4)?, 4)
    } else {
        let yy = num(0..2)?;
        (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
    };
    if s.len() != at + 10 {
        return None;
    }
    let (month, day) = (num(at..at + 2)?, num(at + 2..at + 4)?);
    let (h, m, sec) = (num(at + 4..at + 6)?, num(at + 6..at + 8)?, num(at + 8..at + 10)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::TestResult;

    #[test]
    fn times_table() {
        let cases: [(&[u8], bool, Option<i64>); 6] = [
            (b"700101000000Z", false, Some(0)),
            (b"491231235959Z", false, Some(2_524_607_999)),
            (b"20261201120000Z", true, Some(1_796_126_400)),
            (b"20240229000000Z", true, Some(1_709_164_800)),
            (b"2026120112000Z", true, None),
            (b"261301000000Z", false, None),
        ];
        for (text, four, want) in cases {
            assert_eq!(utc_time(text, four), want, "{}", String::from_utf8_lossy(text));
        }
    }

    #[test]
    fn a_generated_certificate_gives_its_not_after() -> TestResult {
        let mut params = rcgen::CertificateParams::new(vec!["api.example.eu".to_string()])?;
        params.not_after = rcgen::date_time_ymd(2031, 7, 15);
        let key = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        // 2031-07-15T00:00:00Z
        assert_eq!(not_after(cert.der()), Some(1_941_840_000));
        assert_eq!(not_after(&cert.der()[..40]), None);
        assert_eq!(not_after(b""), None);
        Ok(())
    }
}
