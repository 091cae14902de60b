//! A YAML writer whose output means the same to YAML 1.1 readers (PyYAML,
//! so docker-compose v1) and YAML 1.2 readers (compose v2, serde).
//!
//! A string is written plain only when no reader could take it for
//! anything else: it starts with a letter, `_` or `/`, holds only
//! `[A-Za-z0-9_./:@+-]`, does not end in `:`, and is none of YAML 1.1's
//! booleans and nulls (`y`, `n`, `yes`, `no`, `on`, `off`, `true`, `false`,
//! `null`, in any case). Every other string is double-quoted, which covers
//! base-60 integers (`2222:22`), octal (`0755`), leading zeros, `~`,
//! floats such as `1e3` and timestamps. Multi-line strings become literal
//! blocks.

use std::fmt::Write;

use serde_norway::Value;

/// A scalar as text (strings, numbers and booleans); `None` for the rest.
pub fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// `value` as a YAML document.
pub fn to_string(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Mapping(m) if !m.is_empty() => mapping(&mut out, m, 0),
        Value::Sequence(s) if !s.is_empty() => sequence(&mut out, s, 0),
        other => {
            out.push_str(&inline(other));
            out.push('\n');
        }
    }
    out
}

fn pad(out: &mut String, indent: usize) {
    out.extend(std::iter::repeat_n(' ', indent));
}

fn mapping(out: &mut String, m: &serde_norway::Mapping, indent: usize) {
    for (k, v) in m {
        pad(out, indent);
        out.push_str(&inline(k));
        out.push(':');
        value_after_key(out, v, indent);
    }
}

fn sequence(out: &mut String, s: &[Value], indent: usize) {
    for v in s {
        pad(out, indent);
        out.push('-');
        match v {
            Value::Mapping(m) if !m.is_empty() => {
                // The first key on the dash's line, the rest aligned with it.
                let mut first = String::new();
                mapping(&mut first, m, indent + 2);
                out.push(' ');
                out.push_str(first.trim_start());
            }
            Value::Sequence(inner) if !inner.is_empty() => {
                out.push('\n');
                sequence(out, inner, indent + 2);
            }
            other => {
                out.push(' ');
                scalar_line(out, other, indent + 2);
            }
        }
    }
}

fn value_after_key(out: &mut String, v: &Value, indent: usize) {
    match v {
        Value::Mapping(m) if !m.is_empty() => {
            out.push('\n');
            mapping(out, m, indent + 2);
        }
        Value::Sequence(s) if !s.is_empty() => {
            out.push('\n');
            sequence(out, s, indent + 2);
        }
        other => {
            out.push(' ');
            scalar_line(out, other, indent + 2);
        }
    }
}

/// A scalar (or empty collection) and its newline; multi-line strings as a
/// literal block indented by `indent`.
fn scalar_line(out: &mut String, v: &Value, indent: usize) {
    if let Value::String(s) = v {
        if let Some(chomp) = literal_block(s) {
            out.push('|');
            out.push_str(chomp);
            out.push('\n');
            for line in s.strip_suffix('\n').unwrap_or(s).split('\n') {
                if !line.is_empty() {
                    pad(out, indent);
                    out.push_str(line);
                }
                out.push('\n');
            }
            return;
        }
    }
    out.push_str(&inline(v));
    out.push('\n');
}

/// The chomping indicator when `s` can be a literal block: several lines,
/// nothing a block could lose (tabs, carriage returns, leading spaces on
/// the first line, trailing spaces, several trailing newlines).
fn literal_block(s: &str) -> Option<&'static str> {
    let simple = s.contains('\n')
        && !s.starts_with([' ', '\n'])
        && !s.contains(['\t', '\r'])
        && !s.ends_with("\n\n")
        && s.split('\n').all(|l| !l.ends_with(' ') && l.chars().all(|c| !c.is_control()));
    simple.then_some(if s.ends_with('\n') { "" } else { "-" })
}

/// A value on one line: scalars, empty collections, and flow collections
/// for keys (which compose files never need).
fn inline(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => string(s),
        Value::Sequence(s) => format!("[{}]", s.iter().map(inline).collect::<Vec<_>>().join(", ")),
        Value::Mapping(m) => {
            format!(
                "{{{}}}",
                m.iter().map(|(k, v)| format!("{}: {}", inline(k), inline(v))).collect::<Vec<_>>().join(", ")
            )
        }
        Value::Tagged(t) => format!("{} {}", t.tag, inline(&t.value)),
    }
}

/// Whether `s` reads back as the same string under YAML 1.1 and 1.2 when written plain.
fn plain_safe(s: &str) -> bool {
    const AMBIGUOUS: [&str; 9] = ["y", "n", "yes", "no", "on", "off", "true", "false", "null"];
    let Some(first) = s.chars().next() else { return false };
    (first.is_ascii_alphabetic() || first == '_' || first == '/')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "_./:@+-".contains(c))
        && !s.ends_with(':')
        && !AMBIGUOUS.contains(&s.to_ascii_lowercase().as_str())
}

fn string(s: &str) -> String {
    if plain_safe(s) {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() || c == '\u{feff}' || c == '\u{2028}' || c == '\u{2029}' || c == '\u{85}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(text: &str) -> (Value, String) {
        let v: Value = serde_norway::from_str(text).unwrap();
        let written = to_string(&v);
        let back: Value = serde_norway::from_str(&written).unwrap();
        assert_eq!(v, back, "{written}");
        (v, written)
    }

    #[test]
    fn quotes_what_yaml_1_1_reads_differently() {
        let (_, w) = round_trip(
            r#"
restart: "no"
env: {A: "yes", B: "off", C: "0755", D: "~", E: "null", F: "010", G: "1e3", H: "Y", I: "2001-12-14", J: ""}
ports: ["2222:22", "127.0.0.1:8080:80"]
image: postgres:16-alpine
url: http://users:4000/x?a=b
num: 5432
b: true
n: 1
empty: {}
list: []
"#,
        );
        for quoted in [
            r#""no""#,
            r#""yes""#,
            r#""off""#,
            r#""0755""#,
            r#""~""#,
            r#""null""#,
            r#""010""#,
            r#""1e3""#,
            r#""Y""#,
            r#""2001-12-14""#,
            r#""2222:22""#,
            r#""127.0.0.1:8080:80""#,
            r#""""#,
        ] {
            assert!(w.contains(quoted), "{quoted} not quoted in\n{w}");
        }
        assert!(w.contains("image: postgres:16-alpine\n"), "{w}");
        assert!(w.contains("num: 5432\n") && w.contains("\"n\": 1\n") && w.contains("b: true\n"), "{w}");
    }

    #[test]
    fn writes_multi_line_strings_as_blocks_and_nests() {
        let (_, w) = round_trip(
            "a:\n  b:\n  - x: 1\n    y: [1, 2]\n  - - nested\n  c: |\n    line \"one\"\n\n    [table]\n  d: \"no newline\\nat end\"\n  e: \"  lead\\n\"\n",
        );
        assert!(w.contains("c: |\n    line \"one\"\n\n    [table]\n"), "{w}");
        assert!(w.contains("d: |-\n"), "{w}");
    }
}
