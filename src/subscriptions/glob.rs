//! Subscription patterns over stream names: segments split on `/`, `*` matches exactly one
//! segment, `**` any number of segments (zero included). Any other segment matches itself.
//! No partial-segment wildcards (`ab*`): the protocol defines none, so `ab*` is literal.

/// Whether `name` matches `pattern`. Iterative with one backtrack point per `**` seen last,
/// so a hostile pattern (`**/**/**/…`) costs O(segments²) at worst, never exponential.
pub fn matches(pattern: &str, name: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('/').collect();
    let name: Vec<&str> = name.split('/').collect();
    let (mut p, mut n) = (0, 0);
    // Where the last `**` was, and the name position it has swallowed up to.
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(&"**") => {
                star = Some((p, n));
                p += 1;
            }
            Some(&segment) if segment == "*" || segment == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                // Let the last `**` take one more segment and try again after it.
                Some((sp, sn)) => {
                    star = Some((sp, sn + 1));
                    p = sp + 1;
                    n = sn + 1;
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|s| *s == "**")
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn one_segment_and_any_segments() {
        assert!(matches("events/*", "events/a"));
        assert!(!matches("events/*", "events/a/b"));
        assert!(!matches("events/*", "events"));
        assert!(matches("events/**", "events/a/b"));
        assert!(matches("events/**", "events"));
        assert!(matches("**", "x/y/z"));
        assert!(matches("a/**/z", "a/z"));
        assert!(matches("a/**/z", "a/b/c/z"));
        assert!(!matches("a/**/z", "a/b/c/y"));
        assert!(matches("*/b/*", "a/b/c"));
        assert!(matches("exact/name", "exact/name"));
        assert!(!matches("exact/name", "exact/names"));
        assert!(!matches("ab*", "abc"));
        assert!(matches("ab*", "ab*"));
    }

    #[test]
    fn hostile_patterns_stay_cheap() {
        let pattern = vec!["**"; 200].join("/") + "/nomatch";
        let name = vec!["x"; 1000].join("/");
        assert!(!matches(&pattern, &name));
    }
}
