//! agent url: whether the platform may call the URL an agent registers in push mode
//! (the original platform's SSRF check). Only http and https; `localhost` by name; any
//! other name is resolved by the caller and every address it resolves to must pass
//! (none resolved blocks). Always blocked: loopback, link-local (with the cloud
//! metadata address), unspecified, the TEST-NETs, CGNAT, multicast, broadcast,
//! `fc00::/8` and `2001:db8::/32`. Private ranges (RFC 1918, `fd00::/8`) are blocked
//! unless `private_allowed` (the original's SaaS mode).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The host a push URL names, once parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UrlHost {
    Ip(IpAddr),
    /// A DNS name, lower-case, without a trailing dot.
    Name(String),
}

/// Parses a push URL: its host, or why it is refused before any resolution.
pub fn parse(url: &str) -> Result<UrlHost, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("url {url:?} is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("url {url:?}: only http and https are allowed"));
    }
    match parsed.host() {
        Some(url::Host::Ipv4(ip)) => Ok(UrlHost::Ip(ip.into())),
        Some(url::Host::Ipv6(ip)) => Ok(UrlHost::Ip(ip.into())),
        Some(url::Host::Domain(name)) => Ok(UrlHost::Name(name.trim_end_matches('.').to_ascii_lowercase())),
        None => Err(format!("url {url:?} names no host")),
    }
}

/// Whether the name needs no resolution: `localhost` is allowed as the original does.
pub fn allowed_by_name(host: &UrlHost) -> bool {
    matches!(host, UrlHost::Name(n) if n == "localhost")
}

/// Whether every address `host` resolved to may be called; the first one that may not
/// is named. No addresses (a DNS failure) is refused.
pub fn check(url: &str, addresses: &[IpAddr], private_allowed: bool) -> Result<(), String> {
    if addresses.is_empty() {
        return Err(format!("url {url:?}: its host does not resolve"));
    }
    match addresses.iter().find_map(|ip| blocked(*ip, private_allowed).map(|why| (ip, why))) {
        Some((ip, why)) => Err(format!("url {url:?} resolves to {ip}, {why}: the operator will not call it")),
        None => Ok(()),
    }
}

/// Why an address may not be called, if it may not.
pub fn blocked(ip: IpAddr, private_allowed: bool) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => blocked_v4(v4, private_allowed),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => blocked_v4(v4, private_allowed),
            None => blocked_v6(v6, private_allowed),
        },
    }
}

fn blocked_v4(ip: Ipv4Addr, private_allowed: bool) -> Option<&'static str> {
    let o = ip.octets();
    let within =
        |net: [u8; 4], bits: u32| u32::from(ip) >> (32 - bits) == u32::from(Ipv4Addr::from(net)) >> (32 - bits);
    Some(match () {
        _ if ip.is_loopback() => "a loopback address",
        _ if ip.is_link_local() => "a link-local (or cloud metadata) address",
        _ if ip.is_unspecified() || o[0] == 0 => "an unspecified address",
        _ if ip.is_broadcast() => "the broadcast address",
        _ if ip.is_multicast() => "a multicast address",
        _ if within([192, 0, 2, 0], 24) || within([198, 51, 100, 0], 24) || within([203, 0, 113, 0], 24) => {
            "a TEST-NET (documentation) address"
        }
        _ if within([100, 64, 0, 0], 10) => "a carrier-grade NAT (100.64.0.0/10) address",
        _ if ip.is_private() && !private_allowed => "a private (RFC 1918) address",
        _ => return None,
    })
}

fn blocked_v6(ip: Ipv6Addr, private_allowed: bool) -> Option<&'static str> {
    let s = ip.segments();
    Some(match () {
        _ if ip.is_loopback() => "a loopback address",
        _ if ip.is_unspecified() => "an unspecified address",
        _ if s[0] & 0xffc0 == 0xfe80 => "a link-local address",
        _ if ip.is_multicast() => "a multicast address",
        _ if s[0] == 0x2001 && s[1] == 0x0db8 => "a documentation (2001:db8::/32) address",
        _ if s[0] & 0xff00 == 0xfd00 && !private_allowed => "a private (fd00::/8) address",
        _ if s[0] & 0xff00 == 0xfc00 => "a unique-local (fc00::/8) address",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(ip: &str) -> bool {
        blocked(ip.parse().unwrap(), false).is_some()
    }

    #[test]
    fn the_originals_blocked_ranges() {
        for ip in [
            "127.0.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "192.0.2.7",
            "198.51.100.1",
            "203.0.113.9",
            "100.64.0.1",
            "100.127.255.254",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "fe80::1",
            "ff02::1",
            "fc00::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(refused(ip), "{ip} must be blocked");
        }
        for ip in ["93.184.216.34", "100.63.255.255", "100.128.0.1", "2606:4700::1111", "8.8.8.8"] {
            assert!(!refused(ip), "{ip} is public");
        }
    }

    #[test]
    fn private_ranges_only_when_allowed() {
        for ip in ["10.0.0.1", "172.16.0.1", "172.31.255.1", "192.168.1.1", "fd00::1", "fd00:ec2::254"] {
            assert!(refused(ip), "{ip}");
        }
        for ip in ["10.0.0.1", "172.18.0.5", "192.168.1.1", "fd12::1"] {
            assert_eq!(blocked(ip.parse().unwrap(), true), None, "{ip} with private allowed");
        }
        assert!(blocked("fc00::1".parse().unwrap(), true).is_some(), "fc00::/8 stays blocked");
        assert!(blocked("127.0.0.1".parse().unwrap(), true).is_some());
    }

    #[test]
    fn urls_are_http_with_a_host() {
        assert_eq!(parse("http://10.1.2.3:8000/a2a"), Ok(UrlHost::Ip("10.1.2.3".parse().unwrap())));
        assert_eq!(parse("https://[::1]:8000"), Ok(UrlHost::Ip("::1".parse().unwrap())));
        assert_eq!(parse("http://Agent.Example.COM./x"), Ok(UrlHost::Name("agent.example.com".into())));
        assert!(parse("ftp://example.com").unwrap_err().contains("only http and https"));
        assert!(parse("file:///etc/passwd").is_err());
        assert!(parse("not a url").is_err());
        assert!(allowed_by_name(&parse("http://localhost:8000").unwrap()));
        assert!(!allowed_by_name(&parse("http://localhost.example:8000").unwrap()));
    }

    #[test]
    fn every_resolved_address_must_pass() {
        let public: IpAddr = "93.184.216.34".parse().unwrap();
        let metadata: IpAddr = "169.254.169.254".parse().unwrap();
        assert_eq!(check("http://a.example", &[public], false), Ok(()));
        let e = check("http://a.example", &[public, metadata], false).unwrap_err();
        assert!(e.contains("169.254.169.254") && e.contains("link-local"), "{e}");
        assert!(check("http://nowhere.invalid", &[], false).unwrap_err().contains("does not resolve"));
    }
}
