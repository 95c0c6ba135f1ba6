//! Webhook URL safety against hostile spellings (property test): whatever the spelling of a
//! private, loopback, link-local, CGNAT, multicast or metadata address (decimal, octal, hex,
//! short forms, IPv4-mapped IPv6, odd case, percent escapes, full-width digits, userinfo,
//! ports, trailing dots), the check never panics and never lets it through; names are
//! resolved and every address they resolve to is held to the same rule.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anycable_ds::subscriptions::url_guard::{check_static, resolve, Target};
use proptest::prelude::*;

/// The test's own idea of an address a webhook may not reach (written independently of the
/// server's table). `loopback`: whether plain loopback is allowed.
fn forbidden(ip: IpAddr, loopback: bool) -> bool {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4, loopback),
        IpAddr::V6(v6) => {
            if v6 == Ipv6Addr::LOCALHOST {
                return !loopback;
            }
            if let Some(v4) = v6.to_ipv4() {
                return forbidden_v4(v4, false);
            }
            let s = v6.segments()[0];
            // Only 2000::/3 is global unicast.
            v6.is_unspecified() || !(0x2000..0x4000).contains(&s)
        }
    }
}

fn forbidden_v4(ip: Ipv4Addr, loopback: bool) -> bool {
    let [a, b, ..] = ip.octets();
    (ip.is_loopback() && !loopback)
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || a == 0
        || a >= 240
        || (a == 100 && (64..128).contains(&b))
}

/// Addresses that must never be reached (loopback among them).
fn bad_v4() -> impl Strategy<Value = u32> {
    let ranges: Vec<(u32, u32)> = vec![
        (0x0000_0000, 8),  // 0/8
        (0x0a00_0000, 8),  // 10/8
        (0x7f00_0000, 8),  // 127/8
        (0xa9fe_0000, 16), // 169.254/16
        (0xac10_0000, 12), // 172.16/12
        (0xc0a8_0000, 16), // 192.168/16
        (0x6440_0000, 10), // 100.64/10
        (0xe000_0000, 4),  // 224/4
        (0xa9fe_a9fe, 32), // 169.254.169.254
    ];
    prop::sample::select(ranges).prop_flat_map(|(base, bits)| {
        let span = if bits == 32 { 0 } else { (1u64 << (32 - bits)) - 1 } as u32;
        (0..=span).prop_map(move |low| base | low)
    })
}

/// One spelling of an IPv4 address as a URL host.
fn spell(ip: u32, style: u8, upper: bool) -> String {
    let [a, b, c, d] = ip.to_be_bytes();
    let text = match style % 12 {
        0 => format!("{a}.{b}.{c}.{d}"),
        1 => format!("{ip}"),
        2 => format!("0x{ip:x}"),
        3 => format!("0{ip:o}"),
        4 => format!("0x{a:x}.0{b:o}.{c}.0x{d:02x}"),
        5 => format!("{a}.{}", (u32::from(b) << 16) | (u32::from(c) << 8) | u32::from(d)),
        6 => format!("{a}.{b}.{}", (u32::from(c) << 8) | u32::from(d)),
        7 => format!("[::ffff:{a}.{b}.{c}.{d}]"),
        8 => format!("[::ffff:{:x}:{:x}]", ip >> 16, ip & 0xffff),
        9 => format!("[0:0:0:0:0:ffff:{a}.{b}.{c}.{d}]"),
        10 => format!("{a}.{b}.{c}.{d}.").replace('.', "%2E"),
        _ => format!("{a}.{b}.{c}.{d}")
            .chars()
            .map(|ch| char::from_u32(ch as u32 - '0' as u32 + 0xff10).filter(|_| ch.is_ascii_digit()).unwrap_or(ch))
            .collect(),
    };
    if upper {
        text.to_uppercase()
    } else {
        text
    }
}

fn url(host: String, scheme: u8, userinfo: u8, port: Option<u32>, dot: bool, path: u8) -> String {
    let scheme = ["http", "HTTP", "hTtPs", "https"][scheme as usize % 4];
    let userinfo = ["", "", "user@", "a:b@", "%40@", "x@evil.example@"][userinfo as usize % 6];
    let dot = if dot && !host.ends_with(']') { "." } else { "" };
    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
    let path = ["", "/", "/hook", "/%2e%2e/x", "?a=1#f", "\\x"][path as usize % 6];
    format!("{scheme}://{userinfo}{host}{dot}{port}{path}")
}

fn judge(raw: &str, loopback: bool) -> Result<(), TestCaseError> {
    match check_static(raw, loopback) {
        Err(_) => Ok(()),
        Ok((_, Target::Ip(ip))) => {
            prop_assert!(!forbidden(ip, loopback), "{raw} accepted as {ip}");
            Ok(())
        }
        Ok((_, Target::Name(name))) => {
            if let Ok(ip) = name.parse::<IpAddr>() {
                prop_assert!(!forbidden(ip, loopback), "{raw}: the name {name} is a forbidden address");
            }
            // A name is resolved; what it resolves to must pass too (numeric names resolve
            // locally, without DNS).
            if name.bytes().all(|b| b.is_ascii_hexdigit() || b == b'.' || b == b'x') {
                let resolved = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(resolve(&name, loopback));
                for ip in resolved.unwrap_or_default() {
                    prop_assert!(!forbidden(ip, loopback), "{raw} resolved to {ip}, accepted");
                }
            }
            Ok(())
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn hostile_spellings_of_forbidden_addresses_never_pass(
        ip in bad_v4(), style in any::<u8>(), upper in any::<bool>(), scheme in any::<u8>(), userinfo in any::<u8>(),
        port in prop::option::of(0u32..70_000), dot in any::<bool>(), path in any::<u8>(), loopback in any::<bool>(),
    ) {
        let raw = url(spell(ip, style, upper), scheme, userinfo, port, dot, path);
        judge(&raw, loopback)?;
        // A plain spelling of a forbidden address must actually be refused.
        if style % 12 == 0 && userinfo % 6 < 2 && (!Ipv4Addr::from(ip).is_loopback() || !loopback) {
            prop_assert!(check_static(&raw, loopback).is_err(), "{raw}");
        }
    }

    #[test]
    fn arbitrary_text_never_panics(raw in "\\PC{0,80}", host in "[a-zA-Z0-9.:%\\[\\]@_-]{0,40}", loopback in any::<bool>()) {
        let _ = check_static(&raw, loopback);
        judge(&format!("http://{host}/"), loopback)?;
    }
}

#[test]
fn known_tricks() {
    for raw in [
        "http://2130706433/",
        "http://0x7f000001/",
        "http://017700000001/",
        "http://127.1/",
        "http://0x7f.1/",
        "http://[::ffff:7f00:1]/",
        "http://[0:0:0:0:0:ffff:127.0.0.1]/",
        "http://\u{ff11}\u{ff12}\u{ff17}.0.0.1/",
        "http://169.254.169.254./",
        "http://[fd00:ec2::254]/",
        "http://LOCALHOST/",
        "http://localhost./",
        "http://a.localhost/",
        "http://0/",
        "http://[::]/",
        "http://100.100.100.200/",
        "http://%31%32%37.0.0.1/",
    ] {
        assert!(check_static(raw, false).is_err(), "{raw}");
    }
    assert!(check_static("http://[::ffff:127.0.0.1]/", true).is_err(), "mapped loopback is never a test convenience");
    assert!(check_static("http://0.0.0.0/", true).is_err());
    assert!(check_static("http://127.0.0.1:8080/x", true).is_ok());
}
