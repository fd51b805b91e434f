//! Access control on a TLS client's identity, as QEMU's `authz-simple`
//! and `authz-list` objects decide it: rules tried in order, the first
//! that matches gives the verdict, else the default policy does.

/// What a rule (or the default) decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The identity is let in.
    Allow,
    /// The identity is refused.
    Deny,
}

/// How a rule's pattern is compared with an identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchFormat {
    /// Byte for byte.
    Exact,
    /// A shell glob (`*`, `?`, `[...]`, `\` escapes), as `fnmatch(3)`
    /// without flags, which QEMU uses: `*` also matches `/` and `,`.
    Glob,
}

/// One rule of a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The pattern.
    pub pattern: String,
    /// Verdict when it matches.
    pub policy: Policy,
    /// How the pattern is compared.
    pub format: MatchFormat,
}

/// An access list: QEMU's `authz-list` (and `authz-simple`, a list of one
/// exact allow rule that denies everything else).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authz {
    /// Rules, tried in order.
    pub rules: Vec<Rule>,
    /// Verdict when no rule matches.
    pub default: Policy,
}

impl Authz {
    /// QEMU's `authz-simple`: only `identity` is allowed.
    pub fn simple(identity: impl Into<String>) -> Authz {
        Authz {
            rules: vec![Rule { pattern: identity.into(), policy: Policy::Allow, format: MatchFormat::Exact }],
            default: Policy::Deny,
        }
    }

    /// Whether `identity` is let in.
    pub fn is_allowed(&self, identity: &str) -> bool {
        let verdict = self
            .rules
            .iter()
            .find(|r| match r.format {
                MatchFormat::Exact => r.pattern == identity,
                MatchFormat::Glob => glob_match(r.pattern.as_bytes(), identity.as_bytes()),
            })
            .map_or(self.default, |r| r.policy);
        verdict == Policy::Allow
    }
}

/// `fnmatch(pattern, s, 0)`: iterative, with one backtrack point for the
/// last `*`, so hostile patterns cost at most |pattern| x |s|.
pub fn glob_match(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        let step = match p.get(pi) {
            Some(b'*') => {
                star = Some((pi + 1, si));
                pi += 1;
                continue;
            }
            Some(b'?') => Some(pi + 1),
            Some(b'[') => match bracket(p, pi, s[si]) {
                Some((true, next)) => Some(next),
                Some((false, _)) => None,
                // An unterminated bracket is an ordinary character.
                None => (s[si] == b'[').then_some(pi + 1),
            },
            Some(b'\\') if pi + 1 < p.len() => (p[pi + 1] == s[si]).then_some(pi + 2),
            Some(&c) => (c == s[si]).then_some(pi + 1),
            None => None,
        };
        match step {
            Some(next) => {
                pi = next;
                si += 1;
            }
            None => match star {
                Some((sp, ss)) => {
                    pi = sp;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Matches `c` against the bracket expression at `p[start]` (`[`):
/// `Some((matched, index after ]))`, or `None` when it has no closing `]`.
fn bracket(p: &[u8], start: usize, c: u8) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = matches!(p.get(i), Some(b'!') | Some(b'^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let mut lo = *p.get(i)?;
        if lo == b']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if lo == b'\\' {
            i += 1;
            lo = *p.get(i)?;
        }
        i += 1;
        if p.get(i) == Some(&b'-') && p.get(i + 1).is_some_and(|&h| h != b']') {
            let mut hi = p[i + 1];
            i += 2;
            if hi == b'\\' {
                hi = *p.get(i)?;
                i += 1;
            }
            matched |= lo <= c && c <= hi;
        } else {
            matched |= lo == c;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_fnmatch() {
        let m = |p: &str, s: &str| glob_match(p.as_bytes(), s.as_bytes());
        assert!(m("*", ""));
        assert!(m("CN=*,O=Example", "CN=a,b,O=Example"));
        assert!(m("C=GB,O=Example,CN=client?", "C=GB,O=Example,CN=client1"));
        assert!(!m("C=GB,O=Example,CN=client?", "C=GB,O=Example,CN=client12"));
        assert!(m("[a-c]x[!0-9]", "bxz") && !m("[a-c]x[!0-9]", "bx1") && !m("[a-c]x", "dx"));
        assert!(m("a\\*b", "a*b") && !m("a\\*b", "axb"));
        assert!(m("[]]", "]") && m("[x", "[x"));
        assert!(m("*a*a*a*a*b", "aaaaaaaaaaaaaaaaaab") && !m("*a*a*a*a*b", &"a".repeat(2000)));
    }

    #[test]
    fn first_matching_rule_decides() {
        let list = Authz {
            rules: vec![
                Rule { pattern: "CN=bad".into(), policy: Policy::Deny, format: MatchFormat::Exact },
                Rule { pattern: "CN=*".into(), policy: Policy::Allow, format: MatchFormat::Glob },
            ],
            default: Policy::Deny,
        };
        assert!(!list.is_allowed("CN=bad") && list.is_allowed("CN=good") && !list.is_allowed("O=x"));
        let simple = Authz::simple("C=GB,CN=a");
        assert!(simple.is_allowed("C=GB,CN=a") && !simple.is_allowed("C=GB,CN=*"));
    }
}
