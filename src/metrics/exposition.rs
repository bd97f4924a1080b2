//! The two text formats `/metrics` answers in, and the choice between them.
//!
//! `prometheus-client` encodes only OpenMetrics. Scrapers that ask for it (Prometheus
//! does, in its `Accept` header) get that; everything else gets the classic Prometheus
//! text format, version 0.0.4, as the reference Go client does: [`negotiate`] follows
//! `expfmt.Negotiate`, and [`to_classic`] rewrites the OpenMetrics exposition line by line
//! into the classic one (`HELP`/`TYPE` of a counter named with its `_total`, no `# UNIT`,
//! no `_created` samples, no exemplars, timestamps in milliseconds, no `# EOF`).

/// A text exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`.
    Classic,
    /// `application/openmetrics-text`, in the version the scraper asked for (`1.0.0` or
    /// `0.0.1`; the encoding is the same).
    OpenMetrics { v0_0_1: bool },
}

impl Format {
    /// The `Content-Type` of an answer in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Classic => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics { v0_0_1: false } => {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            }
            Format::OpenMetrics { v0_0_1: true } => {
                "application/openmetrics-text; version=0.0.1; charset=utf-8"
            }
        }
    }
}

/// One media range of an `Accept` header.
struct Range<'a> {
    kind: &'a str,
    version: Option<&'a str>,
    q: f32,
    /// Index in the header, so equal preferences keep the scraper's order.
    at: usize,
    /// 0 for `*/*`, 1 for `type/*`, 2 for a full type, plus one per parameter other
    /// than `q` (the more specific range wins among equal `q`).
    specificity: usize,
}

fn parse_accept(header: &str) -> Vec<Range<'_>> {
    let mut ranges: Vec<Range<'_>> = header
        .split(',')
        .enumerate()
        .filter_map(|(at, part)| {
            let mut pieces = part.split(';').map(str::trim);
            let kind = pieces.next().filter(|k| k.contains('/'))?;
            let (mut version, mut q, mut params) = (None, 1.0_f32, 0);
            for p in pieces {
                let Some((k, v)) = p.split_once('=') else {
                    continue;
                };
                let (k, v) = (k.trim(), v.trim().trim_matches('"'));
                if k.eq_ignore_ascii_case("q") {
                    q = v.parse().unwrap_or(0.0);
                } else {
                    params += 1;
                    if k.eq_ignore_ascii_case("version") {
                        version = Some(v);
                    }
                }
            }
            let specificity = match kind {
                "*/*" => 0,
                k if k.ends_with("/*") => 1,
                _ => 2,
            } + params;
            Some(Range {
                kind,
                version,
                q,
                at,
                specificity,
            })
        })
        .collect();
    ranges.sort_by(|a, b| {
        b.q.total_cmp(&a.q)
            .then(b.specificity.cmp(&a.specificity))
            .then(a.at.cmp(&b.at))
    });
    ranges
}

/// The format to answer a scrape whose `Accept` header is `accept`, as the reference Go
/// client chooses it: the first range, by preference, that is the classic text format
/// (`text/plain`, version `0.0.4` or none) or OpenMetrics (version `1.0.0`, `0.0.1` or
/// none); the classic format when none is (no header, `*/*`, protobuf, anything else).
/// A range with `q=0` is refused by the scraper and never chosen.
pub fn negotiate(accept: Option<&str>) -> Format {
    for r in parse_accept(accept.unwrap_or_default()) {
        if r.q <= 0.0 {
            continue;
        }
        if r.kind.eq_ignore_ascii_case("text/plain") && matches!(r.version, None | Some("0.0.4")) {
            return Format::Classic;
        }
        if r.kind.eq_ignore_ascii_case("application/openmetrics-text") {
            match r.version {
                None | Some("1.0.0") => return Format::OpenMetrics { v0_0_1: false },
                Some("0.0.1") => return Format::OpenMetrics { v0_0_1: true },
                Some(_) => {}
            }
        }
    }
    Format::Classic
}

/// Where the sample's name and labels end in an exposition line: after the closing `}`
/// of the label set (quotes and escapes inside label values respected), else at the first
/// space.
fn series_end(line: &str) -> usize {
    let bytes = line.as_bytes();
    let Some(open) = line.find(['{', ' ']) else {
        return line.len();
    };
    if bytes[open] == b' ' {
        return open;
    }
    let (mut in_quotes, mut escaped) = (false, false);
    for (i, &b) in bytes.iter().enumerate().skip(open + 1) {
        match b {
            _ if escaped => escaped = false,
            b'\\' if in_quotes => escaped = true,
            b'"' => in_quotes = !in_quotes,
            b'}' if !in_quotes => return i + 1,
            _ => {}
        }
    }
    line.len()
}

/// One family's type as OpenMetrics names it, and how the classic format names the
/// family and its type.
fn classic_family(name: &str, om_type: &str) -> (String, &'static str) {
    match om_type {
        "counter" => (format!("{name}_total"), "counter"),
        "gauge" => (name.to_string(), "gauge"),
        "histogram" => (name.to_string(), "histogram"),
        "summary" => (name.to_string(), "summary"),
        "info" => (format!("{name}_info"), "gauge"),
        "stateset" => (name.to_string(), "gauge"),
        // gaugehistogram, unknown: no classic type carries them.
        _ => (name.to_string(), "untyped"),
    }
}

/// Rewrites an OpenMetrics text exposition (as `prometheus-client` writes it) into the
/// classic text format 0.0.4.
pub fn to_classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // The family being written: its OpenMetrics name and type.
    let mut family: Option<(String, String)> = None;
    // HELP comes before TYPE in OpenMetrics, but the classic name in both depends on the
    // type: a HELP is held until the next line shows whether a TYPE for it follows.
    let mut pending_help: Option<(String, String)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut words = rest.splitn(3, ' ');
            let (keyword, name, tail) = (
                words.next().unwrap_or_default(),
                words.next().unwrap_or_default(),
                words.next().unwrap_or_default(),
            );
            match keyword {
                "HELP" => {
                    write_help(&mut out, pending_help.take(), None);
                    pending_help = Some((name.to_string(), tail.to_string()));
                }
                "TYPE" => {
                    let (classic, classic_type) = classic_family(name, tail.trim());
                    let help = pending_help.take();
                    let same = help.as_ref().is_some_and(|(n, _)| n == name);
                    write_help(&mut out, help, same.then_some(classic.as_str()));
                    out.push_str(&format!("# TYPE {classic} {classic_type}\n"));
                    family = Some((name.to_string(), tail.trim().to_string()));
                }
                // UNIT, EOF and plain comments have no classic counterpart.
                _ => {}
            }
            continue;
        }
        write_help(&mut out, pending_help.take(), None);
        if line.trim().is_empty() {
            continue;
        }
        let end = series_end(line);
        let series = &line[..end];
        let sample_name = &series[..series.find('{').unwrap_or(series.len())];
        if let Some((fam, kind)) = &family {
            let created = format!("{fam}_created");
            if sample_name == created
                && matches!(kind.as_str(), "counter" | "histogram" | "summary")
            {
                continue;
            }
        }
        let rest = line[end..].trim_start();
        // Value, then an optional timestamp (seconds), then an optional exemplar.
        let rest = rest.split_once(" # ").map_or(rest, |(v, _)| v);
        let mut fields = rest.split_whitespace();
        let value = fields.next().unwrap_or_default();
        out.push_str(series);
        out.push(' ');
        out.push_str(value);
        if let Some(ts) = fields.next().and_then(|t| t.parse::<f64>().ok()) {
            out.push_str(&format!(" {}", (ts * 1000.0).round() as i64));
        }
        out.push('\n');
    }
    write_help(&mut out, pending_help.take(), None);
    out
}

/// Writes a held `HELP` line under `name` (the family's own name when `None`).
/// OpenMetrics escapes `"` in help text; the classic format does not.
fn write_help(out: &mut String, help: Option<(String, String)>, name: Option<&str>) {
    if let Some((own, text)) = help {
        let text = text.replace("\\\"", "\"");
        out.push_str(&format!("# HELP {} {text}\n", name.unwrap_or(&own)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prometheus 2.42's scrape `Accept` header.
    const PROMETHEUS: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

    #[test]
    fn negotiation_follows_the_reference_client() {
        let om = Format::OpenMetrics { v0_0_1: false };
        assert_eq!(negotiate(Some(PROMETHEUS)), om);
        assert_eq!(negotiate(None), Format::Classic);
        assert_eq!(negotiate(Some("")), Format::Classic);
        assert_eq!(negotiate(Some("*/*")), Format::Classic);
        assert_eq!(negotiate(Some("text/plain")), Format::Classic);
        assert_eq!(
            negotiate(Some("text/plain; version=0.0.4")),
            Format::Classic
        );
        assert_eq!(negotiate(Some("application/openmetrics-text")), om);
        assert_eq!(
            negotiate(Some("application/openmetrics-text; version=0.0.1")),
            Format::OpenMetrics { v0_0_1: true }
        );
        // An OpenMetrics version we do not speak: classic.
        assert_eq!(
            negotiate(Some("application/openmetrics-text; version=2.0.0")),
            Format::Classic
        );
        // Preference by q, not by position.
        assert_eq!(
            negotiate(Some(
                "text/plain;version=0.0.4;q=0.5,application/openmetrics-text;q=0.9"
            )),
            om
        );
        assert_eq!(
            negotiate(Some(
                "application/openmetrics-text;q=0.2,text/plain;version=0.0.4;q=0.5"
            )),
            Format::Classic
        );
        // Protobuf (which we do not serve) first: the next acceptable one.
        assert_eq!(
            negotiate(Some("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited,application/openmetrics-text;q=0.7")),
            om
        );
        // Refused with q=0.
        assert_eq!(
            negotiate(Some("application/openmetrics-text;q=0")),
            Format::Classic
        );
        assert_eq!(
            om.content_type(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        assert_eq!(
            Format::Classic.content_type(),
            "text/plain; version=0.0.4; charset=utf-8"
        );
    }

    #[test]
    fn counters_are_named_with_total_in_help_and_type_and_eof_is_gone() {
        let om = "# HELP k_ticks Ticks by outcome.\n# TYPE k_ticks counter\n\
                  k_ticks_total{outcome=\"completed\"} 3\nk_ticks_created{outcome=\"completed\"} 1.7e9\n\
                  # HELP k_up Up \\\"now\\\".\n# TYPE k_up gauge\n# UNIT k_up seconds\nk_up 1\n# EOF\n";
        assert_eq!(
            to_classic(om),
            "# HELP k_ticks_total Ticks by outcome.\n# TYPE k_ticks_total counter\n\
             k_ticks_total{outcome=\"completed\"} 3\n\
             # HELP k_up Up \"now\".\n# TYPE k_up gauge\nk_up 1\n"
        );
    }

    #[test]
    fn histograms_keep_their_samples_and_exemplars_and_timestamps_are_converted() {
        let om = "# HELP d Duration.\n# TYPE d histogram\n\
                  d_sum 1.5\nd_count 2\nd_bucket{le=\"0.5\"} 1 # {trace_id=\"a # b\"} 0.3\n\
                  d_bucket{le=\"+Inf\"} 2\n\
                  # TYPE u unknown\nu{path=\"a } b # c\"} NaN 1700000000.25\n# EOF\n";
        assert_eq!(
            to_classic(om),
            "# HELP d Duration.\n# TYPE d histogram\nd_sum 1.5\nd_count 2\n\
             d_bucket{le=\"0.5\"} 1\nd_bucket{le=\"+Inf\"} 2\n\
             # TYPE u untyped\nu{path=\"a } b # c\"} NaN 1700000000250\n"
        );
    }

    #[test]
    fn info_families_become_gauges_named_info() {
        let om = "# HELP build Build.\n# TYPE build info\nbuild_info{version=\"1\"} 1\n# EOF\n";
        assert_eq!(
            to_classic(om),
            "# HELP build_info Build.\n# TYPE build_info gauge\nbuild_info{version=\"1\"} 1\n"
        );
    }
}
