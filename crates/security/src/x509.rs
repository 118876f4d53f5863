//! Just enough DER to read a certificate's subject: its common names and organisations. The
//! certificate was already verified by rustls; this only names the principal.

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
const OID_O: &[u8] = &[0x55, 0x04, 0x0A];

/// A subject's common names and organisations, in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Subject {
    pub common_names: Vec<String>,
    pub organizations: Vec<String>,
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
                0x0C | 0x13 | 0x16 => String::from_utf8(text.to_vec()).ok()?,
                0x14 => text.iter().map(|&b| b as char).collect(),
                _ => continue,
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
        }
        for i in 0..der.len() {
            let mut bad = der.clone();
            bad[i] ^= 0xFF;
            let _ = subject(&bad);
        }
    }
}
