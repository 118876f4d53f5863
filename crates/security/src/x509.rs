//! Just enough DER to read a certificate's subject: its common names and organisations. The
//! certificate was already verified by rustls; this only names the principal.

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
const OID_O: &[u8] = &[0x55, 0x04, 0x0A];

/// A subject's common names and organisations, in order. Serialized (camelCase) when one
/// node forwards a caller's certificate to another (docs/postgres.md).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subject {
    pub common_names: Vec<String>,
    pub organizations: Vec<String>,
    /// Common names that could not be read as text (in a string type this reader does not
    /// take, or not valid in the one it names): the principal cannot be named safely then.
    pub unreadable_common_names: Vec<String>,
    /// The certificate's notAfter, when the reader set it (the listener does): a principal
    /// it names expires then.
    pub not_after: Option<i64>,
}

/// The name of a DER string type, for messages.
fn string_type(tag: u8) -> String {
    match tag {
        0x0C => "UTF8String".to_owned(),
        0x13 => "PrintableString".to_owned(),
        0x14 => "TeletexString".to_owned(),
        0x16 => "IA5String".to_owned(),
        0x1C => "UniversalString".to_owned(),
        0x1E => "BMPString".to_owned(),
        other => format!("a value of tag 0x{other:02x}"),
    }
}

/// One TLV: the tag, the contents, and what follows.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7F) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let mut len = 0usize;
        for &b in &rest[..n] {
            len = (len << 8) | b as usize;
        }
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

fn expect(input: &[u8], want: u8) -> Option<(&[u8], &[u8])> {
    let (tag, body, rest) = tlv(input)?;
    (tag == want).then_some((body, rest))
}

/// Reads the subject of a DER certificate; `None` when it is not shaped like one.
pub fn subject(der: &[u8]) -> Option<Subject> {
    let (cert, _) = expect(der, SEQUENCE)?;
    let (tbs, _) = expect(cert, SEQUENCE)?;
    let mut fields = tbs;
    // [0] EXPLICIT version, when present.
    if fields.first() == Some(&0xA0) {
        fields = tlv(fields)?.2;
    }
    // serialNumber, signature, issuer, validity, then subject.
    for _ in 0..4 {
        fields = tlv(fields)?.2;
    }
    let (mut name, _) = expect(fields, SEQUENCE)?;
    let mut subject = Subject::default();
    while !name.is_empty() {
        let (mut rdn, rest) = expect(name, SET)?;
        name = rest;
        while !rdn.is_empty() {
            let (attribute, rest) = expect(rdn, SEQUENCE)?;
            rdn = rest;
            let (oid, value) = expect(attribute, OID)?;
            let (tag, text, _) = tlv(value)?;
            // UTF8String, PrintableString, IA5String, TeletexString (read as Latin-1 text).
            let text = match tag {
                0x0C | 0x13 | 0x16 => String::from_utf8(text.to_vec()).ok(),
                0x14 => Some(text.iter().map(|&b| b as char).collect()),
                _ => None,
            };
            let Some(text) = text else {
                // A CN this reader skipped would let the next one name the principal.
                if oid == OID_CN {
                    subject.unreadable_common_names.push(string_type(tag));
                }
                continue;
            };
            if oid == OID_CN {
                subject.common_names.push(text);
            } else if oid == OID_O {
                subject.organizations.push(text);
            }
        }
    }
    Some(subject)
}

/// Reads a certificate's validity: (notBefore, notAfter) in seconds since the epoch.
pub fn validity(der: &[u8]) -> Option<(i64, i64)> {
    let (cert, _) = expect(der, SEQUENCE)?;
    let (tbs, _) = expect(cert, SEQUENCE)?;
    let mut fields = tbs;
    if fields.first() == Some(&0xA0) {
        fields = tlv(fields)?.2;
    }
    // serialNumber, signature, issuer, then validity.
    for _ in 0..3 {
        fields = tlv(fields)?.2;
    }
    let (validity, _) = expect(fields, SEQUENCE)?;
    let (tag, before, rest) = tlv(validity)?;
    let not_before = time(tag, before)?;
    let (tag, after, _) = tlv(rest)?;
    Some((not_before, time(tag, after)?))
}

/// UTCTime (`YYMMDDHHMMSSZ`, years 1950–2049) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn time(tag: u8, text: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(text).ok()?;
    let digits = text.strip_suffix('Z')?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, rest) = match (tag, digits.len()) {
        (0x17, 12) => {
            let yy: i64 = digits[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        (0x18, 14) => (digits[..4].parse().ok()?, &digits[4..]),
        _ => return None,
    };
    let field = |i: usize| rest[i..i + 2].parse::<i64>().ok();
    let (month, day, hour, minute, second) =
        (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Seconds since the epoch as an RFC 3339 time, for messages.
pub fn format_time(seconds: i64) -> String {
    let (days, secs) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    // The inverse of `days_from_civil`.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_subject_of_a_generated_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["svc".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "orders-service");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "writer");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let s = subject(cert.der()).unwrap();
        assert_eq!(s.common_names, vec!["orders-service"]);
        assert_eq!(s.organizations, vec!["writer"]);
        assert!(s.unreadable_common_names.is_empty());
    }

    #[test]
    fn a_common_name_in_another_string_type_is_reported_not_skipped() {
        let mut params = rcgen::CertificateParams::new(vec!["svc".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            rcgen::DnValue::BmpString("someone".try_into().unwrap()),
        );
        params
            .distinguished_name
            .push(rcgen::DnType::CustomDnType(vec![2, 5, 4, 3]), "admin");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let s = subject(cert.der()).unwrap();
        assert_eq!(s.common_names, vec!["admin"]);
        assert_eq!(s.unreadable_common_names, vec!["BMPString"]);
    }

    #[test]
    fn reads_the_validity_of_a_generated_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["svc".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2001, 2, 28);
        // After 2049 the certificate carries a GeneralizedTime.
        params.not_after = rcgen::date_time_ymd(2051, 3, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (before, after) = validity(cert.der()).unwrap();
        assert_eq!(format_time(before), "2001-02-28T00:00:00Z");
        assert_eq!(format_time(after), "2051-03-01T00:00:00Z");
        assert_eq!(before, 983_318_400);
    }

    #[test]
    fn garbage_is_none_never_a_panic() {
        assert_eq!(subject(b""), None);
        assert_eq!(subject(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().to_vec();
        for cut in 0..der.len() {
            let _ = subject(&der[..cut]);
            let _ = validity(&der[..cut]);
        }
        for i in 0..der.len() {
            let mut bad = der.clone();
            bad[i] ^= 0xFF;
            let _ = subject(&bad);
            let _ = validity(&bad);
        }
    }
}
