//! What changed between two workload specs: one [`FieldChange`] per leaf field, and a unified
//! diff of both specs rendered as canonical YAML (camelCase, sorted keys, defaults not filled
//! in), for `gantry apply --dry-run` and the Apply response.
//!
//! Both work on the specs' JSON form (their serde serialization), so a field added to the
//! spec shows up here without any change to this module.

use gantry::workload::Workload;
use serde_json::Value;

/// One changed leaf field of a spec.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldChange {
    /// Field path in the YAML spelling: `replicas`, `resources.memory`, `ports[0].host`,
    /// `env.GREETING`, `labels["app.kubernetes.io/name"]`.
    pub path: String,
    /// The old value; `None` when the field was not set.
    pub old: Option<Value>,
    /// The new value; `None` when the field is no longer set.
    pub new: Option<Value>,
}

/// The changes from `old` to `new` (`None`: the workload does not exist), in path order.
pub fn changes(old: Option<&Workload>, new: Option<&Workload>) -> Vec<FieldChange> {
    let old = old.map(to_value);
    let new = new.map(to_value);
    let mut out = Vec::new();
    walk("", old.as_ref(), new.as_ref(), &mut out);
    out
}

/// A unified diff of the two specs as YAML, with three lines of context; empty when they are
/// equal. `old_label` and `new_label` name the two sides in the `---`/`+++` header.
pub fn unified(
    old_label: &str,
    new_label: &str,
    old: Option<&Workload>,
    new: Option<&Workload>,
) -> String {
    let old = old.map(|w| yaml(&to_value(w))).unwrap_or_default();
    let new = new.map(|w| yaml(&to_value(w))).unwrap_or_default();
    if old == new {
        return String::new();
    }
    let mut out = format!("--- {old_label}\n+++ {new_label}\n");
    for hunk in hunks(&line_diff(&old, &new), CONTEXT) {
        out.push_str(&hunk);
    }
    out
}

fn to_value(w: &Workload) -> Value {
    // A workload is plain data (strings, numbers, maps with string keys): it always serializes.
    serde_json::to_value(w).unwrap_or(Value::Null)
}

/// Appends the leaf changes between `old` and `new` under `path`.
fn walk(path: &str, old: Option<&Value>, new: Option<&Value>, out: &mut Vec<FieldChange>) {
    if old == new {
        return;
    }
    match (old, new) {
        (Some(Value::Object(_)) | None, Some(Value::Object(_)) | None)
            if !is_empty_container(old) || !is_empty_container(new) =>
        {
            let empty = serde_json::Map::new();
            let o = old.and_then(Value::as_object).unwrap_or(&empty);
            let n = new.and_then(Value::as_object).unwrap_or(&empty);
            let mut keys: Vec<&String> = o.keys().chain(n.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                walk(&join(path, key), o.get(key), n.get(key), out);
            }
        }
        (Some(Value::Array(_)) | None, Some(Value::Array(_)) | None)
            if !is_empty_container(old) || !is_empty_container(new) =>
        {
            let empty = Vec::new();
            let o = old.and_then(Value::as_array).unwrap_or(&empty);
            let n = new.and_then(Value::as_array).unwrap_or(&empty);
            for i in 0..o.len().max(n.len()) {
                walk(&format!("{path}[{i}]"), o.get(i), n.get(i), out);
            }
        }
        _ => out.push(FieldChange {
            path: path.to_string(),
            old: old.cloned(),
            new: new.cloned(),
        }),
    }
}

/// Whether `v` is absent or an object or array with nothing in it (reported as a leaf).
fn is_empty_container(v: Option<&Value>) -> bool {
    match v {
        None => true,
        Some(Value::Object(m)) => m.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(_) => false,
    }
}

/// `path.key`, with keys that are not plain words quoted: `labels["app.kubernetes.io/name"]`.
fn join(path: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match (path.is_empty(), plain) {
        (true, true) => key.to_string(),
        (false, true) => format!("{path}.{key}"),
        (_, false) => format!("{path}[{}]", Value::String(key.to_string())),
    }
}

/// Canonical YAML of a JSON value: sorted keys, two-space indents, block style.
pub(crate) fn yaml(value: &Value) -> Vec<String> {
    let mut lines = Vec::new();
    match value {
        Value::Object(map) if !map.is_empty() => yaml_object(map, 0, &mut lines),
        Value::Array(items) if !items.is_empty() => yaml_array(items, 0, &mut lines),
        scalar => lines.push(yaml_scalar(scalar)),
    }
    lines
}

fn yaml_object(map: &serde_json::Map<String, Value>, indent: usize, lines: &mut Vec<String>) {
    let pad = " ".repeat(indent);
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    for key in keys {
        let value = &map[key];
        let key = yaml_key(key);
        match value {
            Value::Object(m) if !m.is_empty() => {
                lines.push(format!("{pad}{key}:"));
                yaml_object(m, indent + 2, lines);
            }
            Value::Array(a) if !a.is_empty() => {
                lines.push(format!("{pad}{key}:"));
                yaml_array(a, indent + 2, lines);
            }
            scalar => lines.push(format!("{pad}{key}: {}", yaml_scalar(scalar))),
        }
    }
}

fn yaml_array(items: &[Value], indent: usize, lines: &mut Vec<String>) {
    let pad = " ".repeat(indent);
    for item in items {
        let start = lines.len();
        match item {
            Value::Object(m) if !m.is_empty() => yaml_object(m, indent + 2, lines),
            Value::Array(a) if !a.is_empty() => yaml_array(a, indent + 2, lines),
            scalar => {
                lines.push(format!("{pad}- {}", yaml_scalar(scalar)));
                continue;
            }
        }
        // The first line of a nested block carries the dash: `- key: value`.
        if let Some(first) = lines.get_mut(start) {
            *first = format!("{pad}- {}", &first[indent + 2..]);
        }
    }
}

fn yaml_key(key: &str) -> String {
    if is_plain(key) {
        key.to_string()
    } else {
        Value::String(key.to_string()).to_string()
    }
}

fn yaml_scalar(value: &Value) -> String {
    match value {
        Value::String(s) if is_plain(s) => s.clone(),
        Value::Object(_) => "{}".to_string(),
        Value::Array(_) => "[]".to_string(),
        // JSON strings, numbers, booleans and null are valid YAML flow scalars.
        other => other.to_string(),
    }
}

/// Whether a string can be written unquoted in YAML and reads back as the same string.
fn is_plain(s: &str) -> bool {
    let reserved = [
        "true", "false", "yes", "no", "on", "off", "null", "~", "y", "n",
    ];
    !s.is_empty()
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | ':' | '@' | '+')
        })
        && !s.starts_with(['-', ':', '@', '.'])
        && !s.ends_with(':')
        && !s.contains(": ")
        && !reserved.contains(&s.to_ascii_lowercase().as_str())
        && s.parse::<f64>().is_err()
        // YAML 1.1 reads these as numbers: 0x1f, 0o17, 1_000, 1:30 (sexagesimal).
        && !(s.starts_with(|c: char| c.is_ascii_digit())
            && (s.starts_with("0x") || s.starts_with("0o") || s.contains(['_', ':'])))
}

/// Lines of context around each change in [`unified`].
const CONTEXT: usize = 3;
/// Largest LCS table (cells) computed; bigger middles are shown as all removed, all added.
const MAX_TABLE: usize = 4_000_000;

/// One line of a line diff.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Line<'a> {
    Same(&'a str),
    Removed(&'a str),
    Added(&'a str),
}

/// A line diff (longest common subsequence) after trimming the common prefix and suffix.
fn line_diff<'a>(old: &'a [String], new: &'a [String]) -> Vec<Line<'a>> {
    let prefix = old.iter().zip(new).take_while(|(a, b)| a == b).count();
    let suffix = old[prefix..]
        .iter()
        .rev()
        .zip(new[prefix..].iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let (o, n) = (
        &old[prefix..old.len() - suffix],
        &new[prefix..new.len() - suffix],
    );
    let mut out: Vec<Line<'a>> = old[..prefix].iter().map(|l| Line::Same(l)).collect();
    if (o.len() + 1) * (n.len() + 1) > MAX_TABLE {
        out.extend(o.iter().map(|l| Line::Removed(l)));
        out.extend(n.iter().map(|l| Line::Added(l)));
    } else {
        // lcs[i][j]: length of the LCS of o[i..] and n[j..].
        let width = n.len() + 1;
        let mut lcs = vec![0u32; (o.len() + 1) * width];
        for i in (0..o.len()).rev() {
            for j in (0..n.len()).rev() {
                lcs[i * width + j] = if o[i] == n[j] {
                    lcs[(i + 1) * width + j + 1] + 1
                } else {
                    lcs[(i + 1) * width + j].max(lcs[i * width + j + 1])
                };
            }
        }
        let (mut i, mut j) = (0, 0);
        while i < o.len() || j < n.len() {
            if i < o.len() && j < n.len() && o[i] == n[j] {
                out.push(Line::Same(&o[i]));
                i += 1;
                j += 1;
            } else if i < o.len()
                && (j == n.len() || lcs[(i + 1) * width + j] >= lcs[i * width + j + 1])
            {
                out.push(Line::Removed(&o[i]));
                i += 1;
            } else {
                out.push(Line::Added(&n[j]));
                j += 1;
            }
        }
    }
    out.extend(old[old.len() - suffix..].iter().map(|l| Line::Same(l)));
    out
}

/// Groups a line diff into `@@ -a,b +c,d @@` hunks with `context` lines around changes.
fn hunks(lines: &[Line<'_>], context: usize) -> Vec<String> {
    let changed: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| !matches!(l, Line::Same(_)))
        .map(|(i, _)| i)
        .collect();
    // Ranges of line indexes to show, merged when their contexts touch.
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for &i in &changed {
        let start = i.saturating_sub(context);
        let end = (i + context + 1).min(lines.len());
        match ranges.last_mut() {
            Some(last) if start <= last.1 => last.1 = end,
            _ => ranges.push((start, end)),
        }
    }
    let mut out = Vec::new();
    for (start, end) in ranges {
        // Line numbers (1-based) of the hunk's first line on each side.
        let old_before = lines[..start]
            .iter()
            .filter(|l| !matches!(l, Line::Added(_)))
            .count();
        let new_before = lines[..start]
            .iter()
            .filter(|l| !matches!(l, Line::Removed(_)))
            .count();
        let body = &lines[start..end];
        let old_len = body.iter().filter(|l| !matches!(l, Line::Added(_))).count();
        let new_len = body
            .iter()
            .filter(|l| !matches!(l, Line::Removed(_)))
            .count();
        let side = |before: usize, len: usize| {
            if len == 0 {
                format!("{before},0")
            } else {
                format!("{},{len}", before + 1)
            }
        };
        let mut hunk = format!(
            "@@ -{} +{} @@\n",
            side(old_before, old_len),
            side(new_before, new_len)
        );
        for line in body {
            let (mark, text) = match line {
                Line::Same(t) => (' ', t),
                Line::Removed(t) => ('-', t),
                Line::Added(t) => ('+', t),
            };
            hunk.push(mark);
            hunk.push_str(text);
            hunk.push('\n');
        }
        out.push(hunk);
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::ops::testing::spec;

    /// The changes between two YAML specs, one `path: old -> new` line each.
    #[track_caller]
    fn check(old: &str, new: &str, expected: &[&str]) {
        let base = "kind: Service\nname: web\nimage: busybox:1.36\n";
        let old = spec(&format!("{base}{old}"));
        let new = spec(&format!("{base}{new}"));
        let show = |v: &Option<Value>| v.as_ref().map_or("-".to_string(), Value::to_string);
        let got: Vec<String> = changes(Some(&old), Some(&new))
            .iter()
            .map(|c| format!("{}: {} -> {}", c.path, show(&c.old), show(&c.new)))
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    #[rustfmt::skip]
    fn field_changes_table() {
        check("replicas: 2\n", "replicas: 2\n", &[]);
        check("replicas: 2\n", "replicas: 3\n", &["replicas: 2 -> 3"]);
        check("", "replicas: 3\n", &["replicas: - -> 3"]);
        check("env: {GREETING: hi}\n", "env: {GREETING: hello}\n", &[r#"env.GREETING: "hi" -> "hello""#]);
        check("", "env: {A: x, B: y}\n", &[r#"env.A: - -> "x""#, r#"env.B: - -> "y""#]);
        check("resources: {memory: 64Mi}\n", "resources: {memory: 128Mi}\n", &[r#"resources.memory: "64Mi" -> "128Mi""#]);
        check("ports: [{container: 80}]\n", "ports: [{container: 80, host: 8080}]\n", &["ports[0].host: - -> 8080"]);
        check("ports: [{container: 80}]\n", "", &[r#"ports[0].container: 80 -> -"#, r#"ports[0].protocol: "tcp" -> -"#]);
        check("labels: {app.kubernetes.io/name: a}\n", "labels: {app.kubernetes.io/name: b}\n", &[r#"labels["app.kubernetes.io/name"]: "a" -> "b""#]);
        check("command: [sh]\n", "command: [sh, -c]\n", &[r#"command[1]: - -> "-c""#]);
    }

    #[test]
    fn creation_lists_every_leaf() {
        let new = spec("kind: Job\nname: once\nimage: busybox\n");
        let paths: Vec<String> = changes(None, Some(&new))
            .into_iter()
            .map(|c| c.path)
            .collect();
        assert!(paths.contains(&"kind".to_string()), "{paths:?}");
        assert!(paths.contains(&"image".to_string()), "{paths:?}");
    }

    #[test]
    fn yaml_is_canonical() {
        let value = json!({
            "name": "web",
            "env": {"B": "2", "A": "yes"},
            "ports": [{"container": 80, "protocol": "tcp"}, {"container": 53}],
            "command": ["sh", "-c", "echo hi: there"],
            "labels": {},
        });
        assert_eq!(
            yaml(&value).join("\n"),
            [
                "command:",
                "  - sh",
                "  - \"-c\"",
                "  - \"echo hi: there\"",
                "env:",
                "  A: \"yes\"",
                "  B: \"2\"",
                "labels: {}",
                "name: web",
                "ports:",
                "  - container: 80",
                "    protocol: tcp",
                "  - container: 53",
            ]
            .join("\n")
        );
    }

    #[test]
    fn unified_diff_shows_the_changed_line_with_context() {
        let old = spec("kind: Service\nname: web\nimage: busybox\nreplicas: 2\n");
        let new = spec("kind: Service\nname: web\nimage: busybox\nreplicas: 3\n");
        let text = unified(
            "web (generation 1)",
            "web (applied)",
            Some(&old),
            Some(&new),
        );
        assert!(
            text.starts_with("--- web (generation 1)\n+++ web (applied)\n@@ "),
            "{text}"
        );
        assert!(text.contains("\n-replicas: 2\n+replicas: 3\n"), "{text}");
        assert_eq!(unified("a", "b", Some(&old), Some(&old)), "");
        let created = unified("/dev/null", "web", None, Some(&new));
        assert!(created.contains("@@ -0,0 +1,"), "{created}");
        assert!(created.contains("\n+kind: Service\n"), "{created}");
    }

    #[test]
    fn hunks_merge_when_contexts_touch() {
        let old: Vec<String> = (0..20).map(|i| format!("l{i}")).collect();
        let mut new = old.clone();
        new[2] = "x".into();
        new[5] = "y".into();
        new[17] = "z".into();
        let hunks = hunks(&line_diff(&old, &new), CONTEXT);
        assert_eq!(hunks.len(), 2, "{hunks:?}");
        assert!(hunks[0].starts_with("@@ -1,9 +1,9 @@\n"), "{}", hunks[0]);
        assert!(hunks[1].starts_with("@@ -15,6 +15,6 @@\n"), "{}", hunks[1]);
    }
}
