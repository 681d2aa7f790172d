//! How the CLI prints: output formats (`-o table|wide|json|yaml`), kubectl-style tables, ages
//! (`5s`, `3m`, `2h`, `4d`), RFC 3339 times, and colour (only on a terminal).

use std::io::IsTerminal;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use comfy_table::presets::NOTHING;
use comfy_table::{Cell, Color, ColumnConstraint, ContentArrangement, Width};
use serde::Serialize;

/// Spaces between two table columns.
const GAP: u16 = 3;

/// Output formats of commands that print objects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A human table.
    #[default]
    Table,
    /// A table with more columns.
    Wide,
    /// JSON (camelCase; lists as `{"kind": "…List", "revision": N, "items": […]}`).
    Json,
    /// YAML, with the same shape as JSON.
    Yaml,
}

/// The `-o/--output` flag of commands that print objects.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct OutputArgs {
    /// Output format: table, wide, json or yaml.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

impl Format {
    /// Whether the format is for people (a table) rather than for scripts.
    pub fn is_table(self) -> bool {
        matches!(self, Format::Table | Format::Wide)
    }
}

/// Whether to colour what goes to stdout: only on a terminal, and never with `NO_COLOR` set.
pub fn stdout_color() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// How a cell reads at a glance; coloured only on a terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    /// Nothing to see.
    Plain,
    /// Healthy (green).
    Good,
    /// In progress or worth a look (yellow).
    Warn,
    /// Broken (red).
    Bad,
}

/// A table of text cells, printed kubectl-style: upper-case headers, columns separated by
/// three spaces, no borders, no trailing spaces.
#[derive(Debug)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<(String, Tone)>>,
    color: bool,
}

impl Table {
    /// An empty table with these column headers.
    pub fn new(header: &[&str], color: bool) -> Self {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
            color,
        }
    }

    /// Adds a row of plain cells.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows
            .push(cells.into_iter().map(|c| (c, Tone::Plain)).collect());
    }

    /// Adds a row whose cells carry a tone.
    pub fn toned_row(&mut self, cells: Vec<(String, Tone)>) {
        self.rows.push(cells);
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The width of each column (the widest of its header and cells).
    pub fn widths(&self) -> Vec<usize> {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, (cell, _)) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(cell.chars().count());
                }
            }
        }
        widths
    }

    /// The table with its header, one line per row, each ending in a newline.
    pub fn render(&self) -> String {
        self.render_with(true, &self.widths())
    }

    /// The rows only, with columns at least `widths` wide: a watch prints the rows that
    /// arrive later under the header of the first table.
    pub fn render_rows(&self, widths: &[usize]) -> String {
        self.render_with(false, widths)
    }

    fn render_with(&self, header: bool, widths: &[usize]) -> String {
        let mut table = comfy_table::Table::new();
        table
            .load_style(NOTHING)
            .set_content_arrangement(ContentArrangement::Disabled);
        if self.color {
            table.enforce_styling();
        } else {
            table.force_no_tty();
        }
        if header {
            table.set_header(self.header.iter().map(Cell::new));
        }
        for row in &self.rows {
            table.add_row(row.iter().map(|(text, tone)| {
                let cell = Cell::new(text);
                match (self.color, tone) {
                    (false, _) | (true, Tone::Plain) => cell,
                    (true, Tone::Good) => cell.fg(Color::Green),
                    (true, Tone::Warn) => cell.fg(Color::Yellow),
                    (true, Tone::Bad) => cell.fg(Color::Red),
                }
            }));
        }
        let columns = self.header.len();
        for (i, column) in table.column_iter_mut().enumerate() {
            let last = i + 1 == columns;
            let padding = if last { 0 } else { GAP };
            column.set_padding((0, padding));
            if let Some(&w) = widths.get(i) {
                // The constraint counts the padding too.
                let w = u16::try_from(w).unwrap_or(u16::MAX).saturating_add(padding);
                column.set_constraint(ColumnConstraint::LowerBoundary(Width::Fixed(w)));
            }
        }
        let mut out = String::new();
        for line in table.lines() {
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `value` as pretty JSON, ending in a newline.
pub fn json<T: Serialize>(value: &T) -> anyhow::Result<String> {
    let mut text = serde_json::to_string_pretty(value).context("writing JSON")?;
    text.push('\n');
    Ok(text)
}

/// `value` as one line of JSON (watch streams print one object per line).
pub fn json_line<T: Serialize>(value: &T) -> anyhow::Result<String> {
    let mut text = serde_json::to_string(value).context("writing JSON")?;
    text.push('\n');
    Ok(text)
}

/// `value` as a YAML document, ending in a newline.
pub fn yaml<T: Serialize>(value: &T) -> anyhow::Result<String> {
    let mut text = serde_saphyr::to_string(value).context("writing YAML")?;
    if !text.ends_with('\n') {
        text.push('\n');
    }
    Ok(text)
}

/// `value` in a machine format (`json` or `yaml`); `None` for the table formats.
pub fn machine<T: Serialize>(format: Format, value: &T) -> anyhow::Result<Option<String>> {
    Ok(match format {
        Format::Json => Some(json(value)?),
        Format::Yaml => Some(yaml(value)?),
        Format::Table | Format::Wide => None,
    })
}

/// A duration the way `AGE` columns show it: the largest whole unit (`5s`, `3m`, `2h`, `4d`).
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// The time since `ts`, as [`short_duration`] writes it; `<unknown>` without a time. A time
/// in the future (clock skew) counts as now.
pub fn age(ts: Option<&prost_types::Timestamp>, now: SystemTime) -> String {
    match ts.and_then(to_system_time) {
        Some(t) => short_duration(now.duration_since(t).unwrap_or_default()),
        None => "<unknown>".to_string(),
    }
}

/// A protobuf timestamp as a `SystemTime`; `None` before the epoch or when malformed.
pub fn to_system_time(ts: &prost_types::Timestamp) -> Option<SystemTime> {
    let secs = u64::try_from(ts.seconds).ok()?;
    let nanos = u32::try_from(ts.nanos).ok()?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// A timestamp in RFC 3339, UTC, whole seconds: `2025-01-31T12:00:05Z`.
pub fn rfc3339(ts: &prost_types::Timestamp) -> String {
    let days = ts.seconds.div_euclid(86_400);
    let secs = ts.seconds.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Year, month, day of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Labels as `k=v,k=v`, sorted; `<none>` when there are none.
pub fn labels<'a>(labels: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    let mut pairs: Vec<String> = labels
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if pairs.is_empty() {
        return "<none>".to_string();
    }
    pairs.sort();
    pairs.join(",")
}

/// `text` with every line indented by `by` spaces (empty lines stay empty).
pub fn indent(text: &str, by: usize) -> String {
    let pad = " ".repeat(by);
    let mut out = String::new();
    for line in text.lines() {
        if !line.is_empty() {
            out.push_str(&pad);
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64) -> prost_types::Timestamp {
        prost_types::Timestamp { seconds, nanos: 0 }
    }

    #[rustfmt::skip]
    #[test]
    fn ages_use_the_largest_whole_unit() {
        let check = |secs: u64, expected: &str| {
            assert_eq!(short_duration(Duration::from_secs(secs)), expected, "{secs}s");
        };
        check(0, "0s");
        check(59, "59s");
        check(60, "1m");
        check(3599, "59m");
        check(3600, "1h");
        check(86_399, "23h");
        check(86_400, "1d");
        check(400 * 86_400, "400d");
    }

    #[test]
    fn age_is_relative_to_now_and_tolerates_skew() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(age(Some(&ts(1_000_000 - 125)), now), "2m");
        assert_eq!(age(Some(&ts(1_000_000 + 5)), now), "0s");
        assert_eq!(age(None, now), "<unknown>");
        assert_eq!(age(Some(&ts(-5)), now), "<unknown>");
    }

    #[rustfmt::skip]
    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(&ts(0)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(&ts(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(&ts(1_735_689_599)), "2024-12-31T23:59:59Z");
        assert_eq!(rfc3339(&ts(1_738_324_805)), "2025-01-31T12:00:05Z");
        assert_eq!(rfc3339(&ts(-1)), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn tables_align_columns_without_borders_or_trailing_spaces() {
        let mut t = Table::new(&["NAME", "STATE", "AGE"], false);
        t.row(vec!["web-1".into(), "Ready".into(), "5s".into()]);
        t.toned_row(vec![
            ("a".into(), Tone::Plain),
            ("CrashLoop".into(), Tone::Bad),
            ("12m".into(), Tone::Plain),
        ]);
        assert_eq!(
            t.render(),
            "NAME    STATE       AGE\n\
             web-1   Ready       5s\n\
             a       CrashLoop   12m\n"
        );
        // Later rows keep the columns of the first table.
        let widths = t.widths();
        let mut later = Table::new(&["NAME", "STATE", "AGE"], false);
        later.row(vec!["b".into(), "Pending".into(), "0s".into()]);
        assert_eq!(later.render_rows(&widths), "b       Pending     0s\n");
    }

    #[test]
    fn colour_is_added_only_when_asked() {
        let mut t = Table::new(&["STATE"], true);
        t.toned_row(vec![("Ready".into(), Tone::Good)]);
        assert!(t.render().contains("\u{1b}["), "{:?}", t.render());
        let mut t = Table::new(&["STATE"], false);
        t.toned_row(vec![("Ready".into(), Tone::Good)]);
        assert!(!t.render().contains('\u{1b}'));
    }

    #[test]
    fn machine_formats_share_one_shape() {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Doc {
            item_count: u32,
            items: Vec<&'static str>,
        }
        let doc = Doc {
            item_count: 2,
            items: vec!["a", "b"],
        };
        let json = machine(Format::Json, &doc).unwrap().unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&json).unwrap(),
            serde_json::json!({"itemCount": 2, "items": ["a", "b"]})
        );
        let yaml = machine(Format::Yaml, &doc).unwrap().unwrap();
        assert!(yaml.contains("itemCount: 2"), "{yaml}");
        assert!(machine(Format::Table, &doc).unwrap().is_none());
    }

    #[test]
    fn labels_and_indentation() {
        let map: std::collections::BTreeMap<String, String> =
            [("b".into(), "2".into()), ("a".into(), "1".into())].into();
        assert_eq!(labels(&map), "a=1,b=2");
        assert_eq!(labels(&std::collections::BTreeMap::new()), "<none>");
        assert_eq!(indent("a\n\nb\n", 2), "  a\n\n  b\n");
    }
}
