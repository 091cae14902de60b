//! Variable substitution as docker compose does it, and `.env` / `env_file`
//! files. The transform reads interpolated values; the output keeps the
//! expressions as written.

use std::collections::BTreeMap;

/// Variables: the project's `.env` overlaid by the process environment.
#[derive(Clone, Debug, Default)]
pub struct Env {
    vars: BTreeMap<String, String>,
}

impl Env {
    /// Variables from `.env` text, then `process` (which wins, as in compose).
    pub fn new(dotenv: Option<&str>, process: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut vars: BTreeMap<String, String> = dotenv.map(parse_env_file).unwrap_or_default().into_iter().collect();
        vars.extend(process);
        Self { vars }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// `text` with `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`,
    /// `${VAR:?error}`, `${VAR?error}`, `${VAR:+alt}`, `${VAR+alt}` and
    /// `$$` substituted; defaults may nest. A required variable that is
    /// missing is an error naming it.
    pub fn interpolate(&self, text: &str) -> Result<String, String> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(i) = rest.find('$') {
            out.push_str(&rest[..i]);
            rest = &rest[i + 1..];
            if let Some(r) = rest.strip_prefix('$') {
                out.push('$');
                rest = r;
            } else if let Some(r) = rest.strip_prefix('{') {
                let end = closing_brace(r).ok_or_else(|| format!("{text:?}: unclosed ${{ in a variable"))?;
                out.push_str(&self.expression(&r[..end], text)?);
                rest = &r[end + 1..];
            } else {
                let len = rest.bytes().take_while(|b| b.is_ascii_alphanumeric() || *b == b'_').count();
                if len == 0 {
                    out.push('$');
                } else {
                    out.push_str(self.get(&rest[..len]).unwrap_or(""));
                    rest = &rest[len..];
                }
            }
        }
        out.push_str(rest);
        Ok(out)
    }

    /// One `${...}` body.
    fn expression(&self, body: &str, whole: &str) -> Result<String, String> {
        let len = body.bytes().take_while(|b| b.is_ascii_alphanumeric() || *b == b'_').count();
        let (name, op) = body.split_at(len);
        if name.is_empty() {
            return Err(format!("{whole:?}: ${{{body}}} names no variable"));
        }
        let value = self.get(name);
        let set_nonempty = value.is_some_and(|v| !v.is_empty());
        let (strict, op) = match op.strip_prefix(':') {
            Some(o) => (true, o),
            None => (false, op),
        };
        let present = if strict { set_nonempty } else { value.is_some() };
        let Some(kind) = op.chars().next() else {
            if strict {
                return Err(format!("{whole:?}: unknown substitution ${{{body}}}"));
            }
            return Ok(value.unwrap_or("").to_owned());
        };
        let arg = &op[kind.len_utf8()..];
        match kind {
            '-' if present => Ok(value.unwrap_or("").to_owned()),
            '-' => self.interpolate(arg),
            '+' if present => self.interpolate(arg),
            '+' => Ok(String::new()),
            '?' if present => Ok(value.unwrap_or("").to_owned()),
            '?' => Err(format!(
                "variable {name} is required ({}): set it in the environment or the project's .env",
                if arg.is_empty() { "no message" } else { arg }
            )),
            _ => Err(format!("{whole:?}: unknown substitution ${{{body}}}")),
        }
    }
}

/// The index of the `}` closing a `${` whose body starts `text`.
fn closing_brace(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return Some(i),
            '}' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// `KEY=VALUE` lines of a `.env` or `env_file` file: `#` comments, blank
/// lines and `export ` prefixes skipped, one level of quotes removed.
pub fn parse_env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let l = l.strip_prefix("export ").unwrap_or(l);
            let (k, v) = l.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            Some((k.trim().to_owned(), v.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_ascii_character_after_a_name_is_an_error_not_a_panic() {
        // Found by fuzzing (compose/fuzz, compose_inject).
        let env = Env::new(None, [("VAR".to_owned(), "1".to_owned())]);
        let err = env.interpolate("${VARÏ}").unwrap_err();
        assert!(err.contains("unknown substitution ${VARÏ}"), "{err}");
        assert!(env.interpolate("${VAR:Ï}").is_err());
        assert_eq!(env.interpolate("${VAR:-é}"), Ok("1".to_owned()));
        assert_eq!(env.interpolate("${NOPE:-é}"), Ok("é".to_owned()));
    }

    #[test]
    fn substitutes_like_compose() {
        let env = Env::new(Some("A=1\nEMPTY=\n# c\nexport Q=\"x y\"\n"), [("B".to_owned(), "2".to_owned())]);
        let i = |s: &str| env.interpolate(s);
        assert_eq!(i("${A}:$B/$$C").unwrap(), "1:2/$C");
        assert_eq!(i("${NOPE:-3000}:3000").unwrap(), "3000:3000");
        assert_eq!(i("${EMPTY:-d}|${EMPTY-d}|${NOPE-d}").unwrap(), "d||d");
        assert_eq!(i("${NOPE:-${A:-9}}").unwrap(), "1");
        assert_eq!(i("${A:+yes}${NOPE:+no}").unwrap(), "yes");
        assert_eq!(i("${Q}").unwrap(), "x y");
        assert!(i("${NOPE:?set it}").unwrap_err().contains("NOPE is required (set it)"));
        assert!(i("${EMPTY:?}").is_err());
        assert_eq!(i("${EMPTY?}").unwrap(), "");
        assert!(i("${A").is_err());
    }
}
