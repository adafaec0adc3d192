//! `allowed_clients`: the TCP peers a worker serves, as PHP-FPM's `listen.allowed_clients`,
//! but with CIDR ranges and IPv6. Parsed once here into networks; a worker asks
//! [`AllowedClients::allows`] for each connection right after accept.

use std::fmt;
use std::net::IpAddr;

/// One allowed network: an address and how many leading bits must match it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    fn contains(&self, peer: IpAddr) -> bool {
        match (self.addr, peer) {
            (IpAddr::V4(net), IpAddr::V4(peer)) => prefix_eq(
                u32::from(net).into(),
                u32::from(peer).into(),
                self.prefix,
                32,
            ),
            (IpAddr::V6(net), IpAddr::V6(peer)) => {
                prefix_eq(u128::from(net), u128::from(peer), self.prefix, 128)
            }
            _ => false,
        }
    }
}

/// Whether the leading `prefix` of the `width` bits of `a` and `b` agree.
fn prefix_eq(a: u128, b: u128, prefix: u8, width: u8) -> bool {
    let shift = u32::from(width - prefix);
    // A shift by the whole width (prefix 0) would overflow: everything matches.
    a.checked_shr(shift).unwrap_or(0) == b.checked_shr(shift).unwrap_or(0) || prefix == 0
}

/// The TCP peers allowed to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedClients {
    nets: Vec<Net>,
}

impl AllowedClients {
    /// Parses each entry: an address (`127.0.0.1`, `::1`) or a range (`10.0.0.0/8`,
    /// `fd00::/8`). The error names the entry and what would be accepted.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<AllowedClients, (String, String)> {
        let nets = entries
            .iter()
            .map(|e| parse_net(e.as_ref().trim()).map_err(|why| (e.as_ref().to_string(), why)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AllowedClients { nets })
    }

    /// Whether a connection from `peer` is served. An IPv4 peer reaching an IPv6 socket
    /// (`::ffff:a.b.c.d`) is matched as the IPv4 address it is.
    pub fn allows(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.nets.iter().any(|n| n.contains(peer))
    }
}

impl fmt::Display for AllowedClients {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, n) in self.nets.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{}/{}", n.addr, n.prefix)?;
        }
        Ok(())
    }
}

fn parse_net(entry: &str) -> Result<Net, String> {
    const EXPECTED: &str = "an IP address or a CIDR range (127.0.0.1, 10.0.0.0/8, ::1, fd00::/8)";
    let (addr, prefix) = match entry.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (entry, None),
    };
    let addr: IpAddr = addr
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| EXPECTED.to_string())?;
    // `::ffff:10.0.0.0/104` is the IPv4 range it maps, as the peers it would match are.
    let (addr, mapped_bits) = match addr.to_canonical() {
        IpAddr::V4(v4) if addr.is_ipv6() => (IpAddr::V4(v4), 96),
        canonical => (canonical, 0),
    };
    let width = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => width,
        Some(p) => {
            let p: u8 = p
                .parse()
                .ok()
                .filter(|&p| p >= mapped_bits && p - mapped_bits <= width)
                .ok_or_else(|| {
                    format!("a prefix length of 0 to {width} after the '/': {EXPECTED}")
                })?;
            p - mapped_bits
        }
    };
    Ok(Net { addr, prefix })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(entries: &[&str]) -> AllowedClients {
        AllowedClients::parse(entries).expect("valid entries")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn single_addresses_v4_and_v6() {
        let a = allow(&["127.0.0.2", "::1"]);
        assert!(a.allows(ip("127.0.0.2")));
        assert!(!a.allows(ip("127.0.0.1")));
        assert!(a.allows(ip("::1")));
        assert!(!a.allows(ip("::2")));
        assert!(allow(&["[::1]"]).allows(ip("::1")), "brackets are accepted");
    }

    #[test]
    fn cidr_edges() {
        let a = allow(&["127.0.0.0/30"]);
        for ok in ["127.0.0.0", "127.0.0.1", "127.0.0.2", "127.0.0.3"] {
            assert!(a.allows(ip(ok)), "{ok}");
        }
        for no in ["127.0.0.4", "126.255.255.255", "127.0.1.0"] {
            assert!(!a.allows(ip(no)), "{no}");
        }
        let host_bits_set = allow(&["10.1.2.3/8"]);
        assert!(host_bits_set.allows(ip("10.200.0.1")), "host bits ignored");
        assert!(!host_bits_set.allows(ip("11.0.0.0")));
        let anyone = allow(&["0.0.0.0/0"]);
        assert!(anyone.allows(ip("1.2.3.4")) && anyone.allows(ip("255.255.255.255")));
        assert!(
            !anyone.allows(ip("::2")),
            "a v4 range does not match v6 peers"
        );
        assert!(allow(&["::/0"]).allows(ip("2001:db8::1")));
        let v6 = allow(&["fd00::/8"]);
        assert!(v6.allows(ip("fdff:ffff::1")) && !v6.allows(ip("fe00::1")));
        let exact = allow(&["2001:db8::1/128"]);
        assert!(exact.allows(ip("2001:db8::1")) && !exact.allows(ip("2001:db8::2")));
    }

    #[test]
    fn mapped_addresses_match_as_ipv4() {
        let a = allow(&["127.0.0.2"]);
        assert!(a.allows(ip("::ffff:127.0.0.2")), "a v4 peer on a v6 socket");
        assert!(!a.allows(ip("::ffff:127.0.0.1")));
        let mapped_range = allow(&["::ffff:10.0.0.0/104"]);
        assert!(mapped_range.allows(ip("10.9.9.9")));
        assert!(!mapped_range.allows(ip("11.0.0.0")));
        assert!(allow(&["::ffff:127.0.0.2"]).allows(ip("127.0.0.2")));
    }

    #[test]
    fn bad_entries_are_named() {
        for bad in [
            "localhost",
            "127.0.0.1/33",
            "::1/129",
            "10.0.0.0/",
            "1.2.3.4/x",
            "",
        ] {
            let (entry, why) = AllowedClients::parse(&["127.0.0.1", bad]).expect_err(bad);
            assert_eq!(entry, bad);
            assert!(why.contains("CIDR"), "{why}");
        }
        assert!(AllowedClients::parse(&["::ffff:10.0.0.0/95"]).is_err());
    }
}
