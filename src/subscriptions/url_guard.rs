//! Where a webhook may be sent (PRODUCT.md §13): never to this host, the private network, a
//! cloud metadata service or any other address that is not public unicast.
//!
//! The URL is parsed once, the WHATWG way (the `url` crate that reqwest uses), so whatever
//! odd spelling a client sends (`http://2130706433/`, `0x7f.1`, `%31%32%37.0.0.1`, a trailing
//! dot, upper case) becomes the same host that delivery connects to: the check and the
//! connection can never disagree about the address. An IP host is checked as is; a name is
//! resolved and every address it resolves to must pass, at subscription time and again at
//! each delivery, where the addresses checked are the only ones connected to (see
//! [`SafeResolver`]): a name that resolves to a public address for the check and to
//! `127.0.0.1` a moment later (DNS rebinding) gains nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use reqwest::Url;

/// How long a name may take to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a webhook URL is refused (the message of a `400 WEBHOOK_URL_REJECTED`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

/// Where a URL points, once its spelling is understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An address that passed.
    Ip(IpAddr),
    /// A name, to be resolved (and every address checked) before use.
    Name(String),
}

/// Checks what can be checked without the network: scheme, credentials, and an IP host.
/// Names that always mean this host (`localhost`, `*.localhost`) count as loopback.
pub fn check_static(raw: &str, allow_loopback: bool) -> Result<(Url, Target), Rejected> {
    let url = Url::parse(raw.trim()).map_err(|e| Rejected(format!("webhook.url is not a valid URL: {e}")))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(Rejected("webhook.url must be http or https".into()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Rejected("webhook.url must not carry credentials".into()));
    }
    let target = match url.host() {
        Some(url::Host::Ipv4(ip)) => Target::Ip(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Target::Ip(IpAddr::V6(ip)),
        Some(url::Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if name.is_empty() {
                return Err(Rejected("webhook.url has no host".into()));
            }
            // `0%2E0%2E0%2E0%2E.` is a name to the URL parser (two trailing dots) but an
            // address once the dots go: judge it as the address. (Other numeric-looking names
            // are caught when resolved: every address a name resolves to is checked.)
            if let Ok(ip) = name.parse::<IpAddr>() {
                check_ip(ip, allow_loopback)?;
            }
            if (name == "localhost" || name.ends_with(".localhost")) && !allow_loopback {
                return Err(Rejected(format!("{name} is this host (loopback)")));
            }
            Target::Name(name)
        }
        None => return Err(Rejected("webhook.url has no host".into())),
    };
    if let Target::Ip(ip) = target {
        check_ip(ip, allow_loopback)?;
    }
    Ok((url, target))
}

/// The full check, resolving a name: every address must pass.
pub async fn check(raw: &str, allow_loopback: bool) -> Result<Url, Rejected> {
    let (url, target) = check_static(raw, allow_loopback)?;
    if let Target::Name(name) = target {
        resolve(&name, allow_loopback).await?;
    }
    Ok(url)
}

/// The addresses of `name`, all of them allowed, or why not.
pub async fn resolve(name: &str, allow_loopback: bool) -> Result<Vec<IpAddr>, Rejected> {
    let found = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name, 0)))
        .await
        .map_err(|_| Rejected(format!("{name} did not resolve within {} s", RESOLVE_TIMEOUT.as_secs())))?
        .map_err(|e| Rejected(format!("{name} does not resolve: {e}")))?;
    let addresses: Vec<IpAddr> = found.map(|a| a.ip()).collect();
    if addresses.is_empty() {
        return Err(Rejected(format!("{name} resolves to no address")));
    }
    for ip in &addresses {
        check_ip(*ip, allow_loopback).map_err(|Rejected(why)| Rejected(format!("{name} resolves to {why}")))?;
    }
    Ok(addresses)
}

/// Whether a webhook may be sent to `ip`.
pub fn check_ip(ip: IpAddr, allow_loopback: bool) -> Result<(), Rejected> {
    let refuse = |what: &str| Err(Rejected(format!("{ip} is {what}")));
    match ip {
        IpAddr::V4(v4) => match v4_class(v4) {
            None => Ok(()),
            Some("loopback") if allow_loopback => Ok(()),
            Some(what) => refuse(what),
        },
        IpAddr::V6(v6) => {
            if v6 == Ipv6Addr::LOCALHOST {
                return if allow_loopback { Ok(()) } else { refuse("loopback") };
            }
            // An IPv4 address written as IPv6 is checked as that address, and never counts
            // as loopback: only the plain spellings of loopback are a test convenience.
            if let Some(v4) = embedded_v4(v6) {
                return match v4_class(v4) {
                    None => Ok(()),
                    Some(what) => refuse(&format!("{what} (as IPv6)")),
                };
            }
            match v6_class(v6) {
                None => Ok(()),
                Some(what) => refuse(what),
            }
        }
    }
}

/// What a non-public IPv4 address is (`None`: public unicast).
fn v4_class(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, ..) => "unspecified (\"this network\")",
        (10, ..) => "private",
        (100, 64..=127, _) => "shared address space (CGNAT)",
        (127, ..) => "loopback",
        (169, 254, 169) if ip.octets()[3] == 254 => "a cloud metadata service",
        (169, 254, _) => "link-local",
        (172, 16..=31, _) => "private",
        (192, 0, 0) => "reserved for protocol assignments",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "reserved for documentation",
        (192, 88, 99) => "reserved (6to4 relay anycast)",
        (192, 168, _) => "private",
        (198, 18..=19, _) => "reserved for benchmarking",
        (224..=239, ..) => "multicast",
        (240..=255, ..) => "reserved (or broadcast)",
        _ => return None,
    })
}

/// The IPv4 address inside an IPv6 spelling of one: IPv4-mapped (`::ffff:a.b.c.d`), the
/// deprecated IPv4-compatible form (`::a.b.c.d`), NAT64 (`64:ff9b::/96`) and 6to4
/// (`2002:AABB:CCDD::/48`).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(tail),
        // `::` and `::1` are handled before; `::x.y.z.w` is only ever a spelling of IPv4.
        [0, 0, 0, 0, 0, 0, _, _] => Some(tail),
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8)),
        _ => None,
    }
}

/// What a non-public IPv6 address is (`None`: global unicast). Only `2000::/3` is public,
/// less the special blocks inside it.
fn v6_class(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip == Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254) {
        return Some("a cloud metadata service");
    }
    Some(match s[0] {
        0 if ip.is_unspecified() => "unspecified",
        0xfc00..=0xfdff => "unique local (private)",
        0xfe80..=0xfebf => "link-local",
        0xfec0..=0xffff if s[0] < 0xff00 => "site-local",
        0xff00..=0xffff => "multicast",
        0x2001 if s[1] < 0x0200 => "reserved for protocol assignments (Teredo, ORCHID…)",
        0x2001 if s[1] == 0x0db8 => "reserved for documentation",
        0x3fff if s[1] < 0x1000 => "reserved for documentation",
        0x2000..=0x3fff => return None,
        _ => "not global unicast",
    })
}

/// reqwest's resolver for webhook deliveries: the system's answer, kept only if every
/// address passes [`check_ip`]. reqwest connects to exactly what this returns.
pub struct SafeResolver {
    pub allow_loopback: bool,
}

impl reqwest::dns::Resolve for SafeResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_loopback = self.allow_loopback;
        let name = name.as_str().to_string();
        Box::pin(async move {
            let addresses = resolve(&name, allow_loopback).await?;
            let addrs: reqwest::dns::Addrs = Box::new(addresses.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(url: &str, loopback: bool) -> bool {
        check_static(url, loopback).is_ok()
    }

    #[test]
    fn private_and_special_addresses_are_refused() {
        for url in [
            "http://10.0.0.1/hook",
            "http://192.168.1.2/",
            "http://172.16.0.1/",
            "http://172.31.255.255/",
            "http://169.254.169.254/latest/meta-data",
            "http://[fd00:ec2::254]/",
            "http://100.64.0.1/",
            "http://0.0.0.0/",
            "http://[::]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:10.0.0.1]/",
            "http://[::ffff:169.254.169.254]/",
            "http://[64:ff9b::a00:1]/",
            "http://[2002:a00:1::]/",
            "http://[fe80::1]/",
            "http://[ff02::1]/",
            "http://224.0.0.1/",
            "http://255.255.255.255/",
            "http://user:pw@example.com/",
            "ftp://example.com/",
        ] {
            assert!(!ok(url, true), "{url}");
        }
    }

    #[test]
    fn loopback_only_with_the_setting() {
        for url in
            ["http://127.0.0.1:9/", "http://[::1]/", "http://localhost/", "http://LOCALHOST./", "http://2130706433/"]
        {
            assert!(!ok(url, false), "{url}");
            assert!(ok(url, true), "{url}");
        }
    }

    #[test]
    fn public_addresses_pass() {
        for url in
            ["https://8.8.8.8/x", "http://[2606:4700::1111]/", "http://[::ffff:8.8.8.8]/", "https://example.com/"]
        {
            assert!(ok(url, false), "{url}");
        }
        assert!(ok("http://172.32.0.1/", false));
        assert!(ok("http://100.128.0.1/", false));
    }
}
