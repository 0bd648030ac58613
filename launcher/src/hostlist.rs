//! Slurm's compressed hostlists (`SLURM_JOB_NODELIST`): `tux[0-5,12,20-25]`, `node64-[17-20]`,
//! `node1,node[2-5,12]`, `rack[1-2]-gpu[01-02]`. Zero padding is kept (`node[08-10]` gives
//! `node08 node09 node10`): a range's width is the width of its lower bound. Expansion is lazy so
//! `first()` and `len()` cost nothing for a 10 000-node job; `scontrol show hostnames` is the
//! reference. The BlueGene 3-D form (`bgl[123x456]`) is not supported and is an error.

use std::fmt;

/// A parsed hostlist: comma-separated items, each a product of literal text and bracket groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hostlist {
    items: Vec<Vec<Segment>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Ranges(Vec<Range>),
}

/// `lo-hi` printed with at least `width` digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Range {
    lo: u64,
    hi: u64,
    width: usize,
}

impl Range {
    fn len(&self) -> u64 {
        self.hi - self.lo + 1
    }
}

/// Why a hostlist did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostlistError(String);

impl fmt::Display for HostlistError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HostlistError {}

fn err(msg: impl Into<String>) -> HostlistError {
    HostlistError(msg.into())
}

impl Hostlist {
    /// Parses a Slurm hostlist expression.
    pub fn parse(text: &str) -> Result<Self, HostlistError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(err("the hostlist is empty"));
        }
        if text.contains(char::is_whitespace) {
            return Err(err(format!("{text:?} contains whitespace")));
        }
        let mut items = Vec::new();
        for item in split_top_level(text)? {
            if item.is_empty() {
                return Err(err("empty host name between commas"));
            }
            items.push(parse_item(item)?);
        }
        Ok(Self { items })
    }

    /// Number of hosts (saturating at `u64::MAX`).
    pub fn len(&self) -> u64 {
        self.items
            .iter()
            .map(|segs| {
                segs.iter().fold(1u64, |acc, s| match s {
                    Segment::Literal(_) => acc,
                    Segment::Ranges(rs) => {
                        acc.saturating_mul(rs.iter().map(Range::len).fold(0, u64::saturating_add))
                    }
                })
            })
            .fold(0, u64::saturating_add)
    }

    /// Always false: a parsed hostlist names at least one host.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The first host, without expanding the rest.
    pub fn first(&self) -> String {
        self.items[0]
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => l.clone(),
                Segment::Ranges(rs) => format!("{:0w$}", rs[0].lo, w = rs[0].width),
            })
            .collect()
    }

    /// Every host, in Slurm's order (later bracket groups vary fastest).
    pub fn hosts(&self) -> impl Iterator<Item = String> + '_ {
        self.items.iter().flat_map(|segs| expand_item(segs))
    }
}

/// Splits on commas that are not inside brackets.
fn split_top_level(text: &str) -> Result<Vec<&str>, HostlistError> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '[' if depth > 0 => return Err(err("nested '[' in a host range")),
            '[' => depth = 1,
            ']' if depth == 0 => return Err(err("']' without a matching '['")),
            ']' => depth = 0,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(err("'[' without a matching ']'"));
    }
    parts.push(&text[start..]);
    Ok(parts)
}

fn parse_item(item: &str) -> Result<Vec<Segment>, HostlistError> {
    let mut segments = Vec::new();
    let mut rest = item;
    while let Some(open) = rest.find('[') {
        if open > 0 {
            segments.push(Segment::Literal(rest[..open].to_string()));
        }
        let close = rest[open..].find(']').expect("brackets were balanced") + open;
        segments.push(Segment::Ranges(parse_ranges(&rest[open + 1..close])?));
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        segments.push(Segment::Literal(rest.to_string()));
    }
    Ok(segments)
}

fn parse_ranges(body: &str) -> Result<Vec<Range>, HostlistError> {
    if body.is_empty() {
        return Err(err("empty brackets '[]'"));
    }
    body.split(',').map(parse_range).collect()
}

fn parse_range(part: &str) -> Result<Range, HostlistError> {
    if part.contains('x') {
        return Err(err(format!(
            "'{part}' is the BlueGene 3-D form, which is not supported: list the hosts instead"
        )));
    }
    let (lo_text, hi_text) = part.split_once('-').unwrap_or((part, part));
    let number = |t: &str| -> Result<u64, HostlistError> {
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err(format!("'{part}' is not a number or a range 'a-b'")));
        }
        t.parse()
            .map_err(|_| err(format!("'{t}' is too large for a host number")))
    };
    let (lo, hi) = (number(lo_text)?, number(hi_text)?);
    if hi < lo {
        return Err(err(format!("range '{part}' goes down ({lo} > {hi})")));
    }
    Ok(Range {
        lo,
        hi,
        width: lo_text.len(),
    })
}

fn expand_item(segs: &[Segment]) -> Box<dyn Iterator<Item = String> + '_> {
    let Some((head, tail)) = segs.split_first() else {
        return Box::new(std::iter::once(String::new()));
    };
    match head {
        Segment::Literal(l) => Box::new(expand_item(tail).map(move |rest| format!("{l}{rest}"))),
        Segment::Ranges(rs) => Box::new(
            rs.iter()
                .flat_map(|r| (r.lo..=r.hi).map(move |n| format!("{n:0w$}", w = r.width)))
                .flat_map(move |n| expand_item(tail).map(move |rest| format!("{n}{rest}"))),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(text: &str) -> Vec<String> {
        Hostlist::parse(text).unwrap().hosts().collect()
    }

    #[test]
    fn plain_names_and_comma_lists() {
        assert_eq!(hosts("gpu-a"), ["gpu-a"]);
        assert_eq!(
            hosts("n1,n2,login.example.org"),
            ["n1", "n2", "login.example.org"]
        );
    }

    #[test]
    fn bracketed_ranges_keep_zero_padding() {
        assert_eq!(
            hosts("node[01-04,07]"),
            ["node01", "node02", "node03", "node04", "node07"]
        );
        assert_eq!(hosts("node[08-10]"), ["node08", "node09", "node10"]);
        assert_eq!(hosts("node[9-11]"), ["node9", "node10", "node11"]);
        assert_eq!(hosts("n[001-002]"), ["n001", "n002"]);
    }

    #[test]
    fn prefix_with_dash_and_several_groups() {
        assert_eq!(
            hosts("node64-[17-20]"),
            ["node64-17", "node64-18", "node64-19", "node64-20"]
        );
        assert_eq!(
            hosts("node1,node[2-5,12],gpu[1-2]"),
            ["node1", "node2", "node3", "node4", "node5", "node12", "gpu1", "gpu2"]
        );
        assert_eq!(hosts("tux[0-5,12,20-25]").len(), 13);
    }

    #[test]
    fn several_brackets_in_one_name_and_a_suffix() {
        assert_eq!(
            hosts("rack[1-2]-gpu[01-02].ib"),
            [
                "rack1-gpu01.ib",
                "rack1-gpu02.ib",
                "rack2-gpu01.ib",
                "rack2-gpu02.ib"
            ]
        );
    }

    #[test]
    fn first_and_len_do_not_expand() {
        let list = Hostlist::parse("big[0000-9999],other[5-6]").unwrap();
        assert_eq!(list.first(), "big0000");
        assert_eq!(list.len(), 10_002);
        let huge = Hostlist::parse("h[0-18446744073709551614]").unwrap();
        assert_eq!(huge.first(), "h0");
        assert_eq!(huge.len(), u64::MAX);
    }

    #[test]
    fn malformed_lists_are_errors() {
        for bad in [
            "",
            "node[",
            "node]",
            "node[]",
            "node[1-]",
            "node[a-b]",
            "node[5-3]",
            "a,,b",
            "n[[1]]",
            "bgl[123x456]",
            "node 1",
        ] {
            assert!(Hostlist::parse(bad).is_err(), "{bad:?} parsed");
        }
        let e = Hostlist::parse("node[5-3]").unwrap_err();
        assert_eq!(e.to_string(), "range '5-3' goes down (5 > 3)");
    }
}
