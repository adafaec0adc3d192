//! A checker for the OpenMetrics 1.0 text exposition, after the ABNF of the specification
//! (github.com/OpenObservability/OpenMetrics, `specification/OpenMetrics.md`), so the status
//! tests hold the page to the grammar a scraper parses rather than to a few string tests.
//!
//! Checked: every line is a descriptor (`# TYPE`, `# HELP`, `# UNIT`) or a sample, ended by
//! LF; the exposition ends with `# EOF` and nothing follows it; metric names match
//! `[a-zA-Z_:][a-zA-Z0-9_:]*` and label names `[a-zA-Z_][a-zA-Z0-9_]*`; label values and HELP
//! text escape only `\\`, `\n` and `\"` (and hold no raw `"`, `\` or LF); numbers are real
//! numbers or `±Inf` / `NaN`; a family's descriptors come before its samples, each once, and a
//! family appears once; a sample's name is its family's name plus a suffix its type allows
//! (`_total` for a counter); a unit is the suffix of its family's name; a counter's total is
//! neither negative nor NaN; no sample repeats a label set or a label. A histogram's buckets
//! each have an `le`, in increasing order ending at `+Inf`, with counts that never decrease,
//! and its `_count`, if any, is the `+Inf` bucket's. Exemplars are rejected as unsupported:
//! this project emits none.

use std::collections::HashSet;

/// One sample line, label values unescaped.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's name (a counter's ends with `_total`).
    pub name: String,
    /// Its labels in order.
    pub labels: Vec<(String, String)>,
    /// Its value.
    pub value: f64,
}

impl Sample {
    /// The value of label `name`.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The metric types of OpenMetrics 1.0, with the suffixes their samples may add to the
/// family's name.
const TYPES: [(&str, &[&str]); 8] = [
    ("counter", &["_total", "_created"]),
    ("gauge", &[""]),
    ("histogram", &["_bucket", "_count", "_sum", "_created"]),
    ("gaugehistogram", &["_gbucket", "_gcount", "_gsum"]),
    ("stateset", &[""]),
    ("info", &["_info"]),
    ("summary", &["", "_count", "_sum", "_created"]),
    ("unknown", &[""]),
];

/// The family being read: its descriptors so far and whether a sample came yet.
struct Family {
    name: String,
    kind: Option<&'static str>,
    help: bool,
    unit: bool,
    has_samples: bool,
    label_sets: HashSet<(String, Vec<(String, String)>)>,
}

impl Family {
    fn new(name: &str) -> Family {
        Family {
            name: name.to_string(),
            kind: None,
            help: false,
            unit: false,
            has_samples: false,
            label_sets: HashSet::new(),
        }
    }

    fn kind(&self) -> &'static str {
        self.kind.unwrap_or("unknown")
    }

    /// Whether a sample called `sample` belongs to this family.
    fn owns(&self, sample: &str) -> bool {
        let suffixes = TYPES
            .iter()
            .find(|(k, _)| *k == self.kind())
            .map_or(&[""][..], |(_, s)| s);
        sample
            .strip_prefix(self.name.as_str())
            .is_some_and(|rest| suffixes.contains(&rest))
    }
}

/// Checks `text` against the grammar; the samples in order, or the first line that breaks
/// it and why.
pub fn check(text: &str) -> Result<Vec<Sample>, String> {
    // `exposition = metricset HASH SP eof [ LF ]`
    let body = text
        .strip_suffix("# EOF\n")
        .or_else(|| text.strip_suffix("# EOF"))
        .ok_or_else(|| format!("does not end with `# EOF`: ...{:?}", tail(text)))?;
    if !body.is_empty() && !body.ends_with('\n') {
        return Err(format!(
            "`# EOF` is not on a line of its own: ...{:?}",
            tail(body)
        ));
    }
    let mut samples = Vec::new();
    // Families already ended, and the one being read.
    let mut done: Vec<Family> = Vec::new();
    let mut family: Option<Family> = None;
    for (i, line) in body.split_terminator('\n').enumerate() {
        let at = |why: String| format!("line {}: {why}: {line:?}", i + 1);
        if let Some(rest) = line.strip_prefix('#') {
            let (keyword, name, arg) = descriptor(rest).map_err(at)?;
            let same = family
                .as_ref()
                .is_some_and(|f| f.name == name && !f.has_samples);
            if !same {
                done.extend(family.take());
                if done.iter().any(|f| f.name == name) {
                    return Err(at(format!("family {name} appears twice")));
                }
            }
            let current = family.get_or_insert_with(|| Family::new(name));
            match keyword {
                "TYPE" => {
                    if current.kind.is_some() {
                        return Err(at(format!("a second TYPE for {name}")));
                    }
                    let kind = TYPES
                        .iter()
                        .map(|(k, _)| *k)
                        .find(|k| *k == arg)
                        .ok_or_else(|| at(format!("unknown metric type {arg:?}")))?;
                    current.kind = Some(kind);
                }
                "HELP" => {
                    if std::mem::replace(&mut current.help, true) {
                        return Err(at(format!("a second HELP for {name}")));
                    }
                    unescape(arg).map_err(at)?;
                }
                _ => {
                    if std::mem::replace(&mut current.unit, true) {
                        return Err(at(format!("a second UNIT for {name}")));
                    }
                    if !arg.chars().all(is_name_char) {
                        return Err(at(format!("unit {arg:?} is not made of name characters")));
                    }
                    if !arg.is_empty() && !name.ends_with(&format!("_{arg}")) {
                        return Err(at(format!("{name} does not end with its unit _{arg}")));
                    }
                }
            }
            continue;
        }
        let sample = sample(line).map_err(at)?;
        if !family.as_ref().is_some_and(|f| f.owns(&sample.name)) {
            // A sample outside the family before it starts a family of its own, of unknown
            // type and without descriptors, unless its name is taken (a counter's sample
            // without `_total` lands here).
            done.extend(family.take());
        }
        if let Some(other) = done
            .iter()
            .find(|f| f.name == sample.name || f.owns(&sample.name))
        {
            return Err(at(format!(
                "{} belongs to family {}, which ended before (or has the wrong suffix)",
                sample.name, other.name
            )));
        }
        let current = family.get_or_insert_with(|| Family::new(&sample.name));
        current.has_samples = true;
        if current.kind() == "counter"
            && sample.name.ends_with("_total")
            && (sample.value.is_nan() || sample.value < 0.0)
        {
            return Err(at(format!(
                "counter total {} is negative or NaN",
                sample.value
            )));
        }
        let mut labels = sample.labels.clone();
        labels.sort();
        if !current.label_sets.insert((sample.name.clone(), labels)) {
            return Err(at(
                "a second sample with the same name and labels".to_string()
            ));
        }
        samples.push(sample);
    }
    for f in done.iter().chain(family.iter()) {
        if f.kind() == "histogram" {
            histogram(&f.name, &samples)?;
        }
    }
    Ok(samples)
}

/// The labels of `s` other than `le`, sorted: which series of a histogram it belongs to.
fn series(s: &Sample) -> Vec<(String, String)> {
    let mut labels: Vec<_> = s
        .labels
        .iter()
        .filter(|(n, _)| n != "le")
        .cloned()
        .collect();
    labels.sort();
    labels
}

/// The bucket rules of histogram `name`, series by series.
fn histogram(name: &str, samples: &[Sample]) -> Result<(), String> {
    let bucket_name = format!("{name}_bucket");
    let count_name = format!("{name}_count");
    let mut seen: Vec<Vec<(String, String)>> = Vec::new();
    for s in samples.iter().filter(|s| s.name == bucket_name) {
        let labels = series(s);
        if seen.contains(&labels) {
            continue;
        }
        let buckets: Vec<&Sample> = samples
            .iter()
            .filter(|b| b.name == bucket_name && series(b) == labels)
            .collect();
        let mut last: Option<(f64, f64)> = None;
        for b in &buckets {
            let le = b
                .label("le")
                .ok_or_else(|| format!("a bucket of {name} without le"))?;
            let le = number(le).map_err(|e| format!("{name} le: {e}"))?;
            if b.value.is_nan() || b.value < 0.0 {
                return Err(format!("{name} bucket le={le} counts {}", b.value));
            }
            if let Some((prev_le, prev)) = last {
                if le <= prev_le {
                    return Err(format!(
                        "{name} buckets out of order: le={le} after le={prev_le}"
                    ));
                }
                if b.value < prev {
                    return Err(format!(
                        "{name} bucket le={le} counts less than le={prev_le}"
                    ));
                }
            }
            last = Some((le, b.value));
        }
        let Some((le, inf)) = last.filter(|(le, _)| *le == f64::INFINITY) else {
            return Err(format!("{name} has no le=\"+Inf\" bucket last"));
        };
        let count = samples
            .iter()
            .find(|c| c.name == count_name && series(c) == labels);
        if let Some(c) = count {
            if c.value != inf {
                return Err(format!(
                    "{name}_count {} is not the le={le} bucket's {inf}",
                    c.value
                ));
            }
        }
        seen.push(labels);
    }
    Ok(())
}

fn tail(s: &str) -> &str {
    let start = s.char_indices().rev().nth(40).map_or(0, |(i, _)| i);
    &s[start..]
}

/// `# TYPE name type`, `# HELP name text` or `# UNIT name unit`, after the `#`: keyword,
/// name, argument.
fn descriptor(rest: &str) -> Result<(&str, &str, &str), String> {
    let rest = rest
        .strip_prefix(' ')
        .ok_or("a `#` line that is not `# TYPE`, `# HELP` or `# UNIT`")?;
    let (keyword, rest) = rest.split_once(' ').ok_or("a descriptor without a name")?;
    if !matches!(keyword, "TYPE" | "HELP" | "UNIT") {
        return Err(format!(
            "`# {keyword}` is no descriptor (OpenMetrics has TYPE, HELP and UNIT, no comments)"
        ));
    }
    let (name, arg) = rest
        .split_once(' ')
        .ok_or_else(|| format!("`# {keyword}` needs a name and a value after one space each"))?;
    metric_name(name)?;
    Ok((keyword, name, arg))
}

/// `metricname [labels] SP number [SP timestamp]`.
fn sample(line: &str) -> Result<Sample, String> {
    let end = line.find(['{', ' ']).ok_or("a sample without a value")?;
    let name = &line[..end];
    metric_name(name)?;
    let mut rest = &line[end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = parse_labels(after, &mut labels)?;
    }
    let rest = rest
        .strip_prefix(' ')
        .ok_or("the value must follow the name or labels after one space")?;
    let mut fields = rest.split(' ');
    let value = number(fields.next().unwrap_or(""))?;
    if let Some(ts) = fields.next() {
        if ts == "#" {
            return Err("exemplars are not supported by this checker".to_string());
        }
        number(ts).map_err(|e| format!("timestamp: {e}"))?;
    }
    if let Some(extra) = fields.next() {
        return Err(format!(
            "unexpected {extra:?} after the value and timestamp"
        ));
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// `label *(COMMA label) "}"` after the `{`; the rest of the line after the `}`.
fn parse_labels<'a>(mut s: &'a str, labels: &mut Vec<(String, String)>) -> Result<&'a str, String> {
    if let Some(rest) = s.strip_prefix('}') {
        return Ok(rest);
    }
    loop {
        let (name, rest) = s.split_once("=\"").ok_or("a label without =\"value\"")?;
        label_name(name)?;
        if labels.iter().any(|(n, _)| n == name) {
            return Err(format!("label {name} appears twice"));
        }
        // The value ends at the first `"` not escaped by a backslash.
        let mut end = None;
        let mut escaped = false;
        for (i, c) in rest.char_indices() {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        let end = end.ok_or_else(|| format!("the value of label {name} is not closed"))?;
        let value = unescape(&rest[..end]).map_err(|e| format!("label {name}: {e}"))?;
        labels.push((name.to_string(), value));
        let rest = &rest[end + 1..];
        if let Some(rest) = rest.strip_prefix('}') {
            return Ok(rest);
        }
        s = rest
            .strip_prefix(',')
            .ok_or_else(|| format!("after label {name}: expected `,` or `}}`"))?;
    }
}

/// `escaped-string`: any character but LF, `"` and `\`, which are written `\n`, `\"`, `\\`.
fn unescape(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('\\') => out.push('\\'),
                Some('n') => out.push('\n'),
                Some('"') => out.push('"'),
                Some(c) => return Err(format!("escape \\{c} is not \\\\, \\n or \\\"")),
                None => return Err("a lone `\\` at the end".to_string()),
            },
            '"' => return Err("a raw `\"` must be written `\\\"`".to_string()),
            '\n' => return Err("a raw line feed must be written `\\n`".to_string()),
            c => out.push(c),
        }
    }
    Ok(out)
}

fn metric_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    if first_ok && chars.all(is_name_char) {
        Ok(())
    } else {
        Err(format!(
            "metric name {name:?} does not match [a-zA-Z_:][a-zA-Z0-9_:]*"
        ))
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn label_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(())
    } else {
        Err(format!(
            "label name {name:?} does not match [a-zA-Z_][a-zA-Z0-9_]*"
        ))
    }
}

/// `realnumber / [sign] "inf" / [sign] "infinity" / "nan"` (the words in any case).
fn number(s: &str) -> Result<f64, String> {
    let bad = || format!("{s:?} is not an OpenMetrics number");
    let unsigned = s.strip_prefix(['+', '-']).unwrap_or(s);
    let word = unsigned.to_ascii_lowercase();
    if word == "inf" || word == "infinity" {
        return s.parse().map_err(|_| bad());
    }
    if s.eq_ignore_ascii_case("nan") {
        return Ok(f64::NAN);
    }
    // `[sign] digits ["." digits] ["e" [sign] digits]`, with a digit on one side of the point.
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (unsigned, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = digits(int) && digits(frac) && !(int.is_empty() && frac.is_empty());
    let exponent_ok = match exponent {
        None => true,
        Some(e) => {
            let e = e.strip_prefix(['+', '-']).unwrap_or(e);
            !e.is_empty() && digits(e)
        }
    };
    if !(mantissa_ok && exponent_ok) {
        return Err(bad());
    }
    s.parse().map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
# TYPE app_requests counter
# HELP app_requests Requests served, \\\"all\\\" of them.\\nSecond line.
app_requests_total{pool=\"w\\\"w\\\\w\\n\",code=\"200\"} 5
app_requests_total{pool=\"www\",code=\"500\"} 0 1700000000.5
app_requests_created{pool=\"www\",code=\"200\"} 1.7e9
# TYPE app_memory_bytes gauge
# UNIT app_memory_bytes bytes
app_memory_bytes -1.5
app_memory_bytes{pid=\"1\"} +Inf
app:ratio NaN
app_point 1.
app_empty{} 1
# EOF
";

    #[test]
    fn a_valid_exposition_passes_with_its_samples() {
        let samples = check(GOOD).expect("valid");
        assert_eq!(samples.len(), 8);
        assert_eq!(samples[0].name, "app_requests_total");
        assert_eq!(samples[0].label("pool"), Some("w\"w\\w\n"));
        assert_eq!(samples[0].label("code"), Some("200"));
        assert_eq!(samples[0].value, 5.0);
        assert_eq!(samples[4].value, f64::INFINITY);
        assert!(samples[5].value.is_nan());
        assert!(
            check(GOOD.trim_end()).is_ok(),
            "the LF after # EOF is optional"
        );
        assert!(check("# EOF\n").is_ok(), "an empty exposition");
        let histogram = "# TYPE h_seconds histogram\n# UNIT h_seconds seconds\n\
            h_seconds_bucket{p=\"a\",le=\"0.5\"} 1\nh_seconds_bucket{p=\"a\",le=\"+Inf\"} 3\n\
            h_seconds_sum{p=\"a\"} 2.5\nh_seconds_count{p=\"a\"} 3\n\
            h_seconds_bucket{p=\"b\",le=\"+Inf\"} 0\nh_seconds_count{p=\"b\"} 0\n# EOF\n";
        assert_eq!(check(histogram).expect("a valid histogram").len(), 6);
    }

    #[test]
    fn each_broken_rule_is_caught() {
        let cases: &[(&str, &str)] = &[
            ("a 1\n", "no # EOF"),
            ("a 1\n# EOF\nb 2\n", "a line after # EOF"),
            ("a 1# EOF\n", "# EOF not on its own line"),
            ("1a 1\n# EOF\n", "a name starting with a digit"),
            ("a-b 1\n# EOF\n", "a dash in a name"),
            (
                "a{1x=\"v\"} 1\n# EOF\n",
                "a label name starting with a digit",
            ),
            ("a{x:y=\"v\"} 1\n# EOF\n", "a colon in a label name"),
            ("a{x=\"v\"\"} 1\n# EOF\n", "a raw quote in a label value"),
            (
                "a{x=\"\\t\"} 1\n# EOF\n",
                "an escape other than \\\\ \\n \\\"",
            ),
            ("a{x=\"v} 1\n# EOF\n", "an unclosed label value"),
            ("a{x=\"v\" y=\"w\"} 1\n# EOF\n", "labels without a comma"),
            ("a{x=\"v\",x=\"w\"} 1\n# EOF\n", "a label twice"),
            ("a{x=\"v\"} 1\na{x=\"v\"} 2\n# EOF\n", "a label set twice"),
            ("a  1\n# EOF\n", "two spaces before the value"),
            ("a one\n# EOF\n", "a value that is no number"),
            ("a 0x10\n# EOF\n", "a hexadecimal value"),
            ("a 1 2 3\n# EOF\n", "a field after the timestamp"),
            ("a 1 # {x=\"y\"} 1\n# EOF\n", "an exemplar"),
            ("a\n# EOF\n", "no value"),
            ("\n# EOF\n", "a blank line"),
            ("# a comment\n# EOF\n", "a comment"),
            ("#TYPE a gauge\n# EOF\n", "no space after #"),
            ("# TYPE a meter\n# EOF\n", "an unknown type"),
            ("# TYPE a gauge\n# TYPE a gauge\n# EOF\n", "TYPE twice"),
            ("# HELP a x\n# HELP a y\n# EOF\n", "HELP twice"),
            ("# HELP a say \"hi\"\n# EOF\n", "a raw quote in HELP"),
            (
                "# TYPE a_seconds gauge\n# UNIT a_seconds bytes\n# EOF\n",
                "a unit not the suffix",
            ),
            (
                "# TYPE a counter\na 1\n# EOF\n",
                "a counter sample without _total",
            ),
            (
                "# TYPE a counter\na_total -1\n# EOF\n",
                "a negative counter",
            ),
            (
                "# TYPE a gauge\na 1\n# HELP a late\n# EOF\n",
                "a descriptor after samples",
            ),
            (
                "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\na 2\n# EOF\n",
                "a family twice",
            ),
            (
                "# TYPE a gauge\n# TYPE b gauge\n# TYPE a gauge\n# EOF\n",
                "descriptors twice",
            ),
            (
                "# TYPE a counter\na_total 1\nb 1\na_total{x=\"y\"} 1\n# EOF\n",
                "a counter twice",
            ),
            (
                "# TYPE a counter\na_total 1\n# TYPE a_total gauge\na_total 2\n# EOF\n",
                "a clash",
            ),
            (
                "# TYPE h histogram\nh_bucket 1\n# EOF\n",
                "a bucket without le",
            ),
            (
                "# TYPE h histogram\nh_bucket{le=\"1.0\"} 1\n# EOF\n",
                "no +Inf bucket",
            ),
            (
                "# TYPE h histogram\nh_bucket{le=\"1.0\"} 2\nh_bucket{le=\"+Inf\"} 1\n# EOF\n",
                "a bucket counting less than the one before",
            ),
            (
                "# TYPE h histogram\nh_bucket{le=\"2.0\"} 1\nh_bucket{le=\"1.0\"} 1\nh_bucket{le=\"+Inf\"} 1\n# EOF\n",
                "buckets out of order",
            ),
            (
                "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 3\n# EOF\n",
                "a count that is not the +Inf bucket",
            ),
        ];
        for (text, why) in cases {
            assert!(check(text).is_err(), "{why} passed: {text:?}");
        }
    }
}
