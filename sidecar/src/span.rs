//! Human-friendly positive durations (`90s`, `5m`, `24h`, `7d`, `1h30m`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A strictly positive duration written as `<number><unit>` pairs.
///
/// Units: `ms`, `s`, `m`, `h`, `d`. Zero and negative values are rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span(Duration);

/// Why a duration string was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpanError {
    /// The text is empty.
    #[error("empty duration; write it like 24h, 90m or 30s")]
    Empty,
    /// The value is negative.
    #[error("duration {0:?} is negative; give a positive value such as 24h")]
    Negative(String),
    /// The value is zero.
    #[error("duration {0:?} is zero; give a positive value such as 24h")]
    Zero(String),
    /// The text is not `<number><unit>` pairs.
    #[error("cannot read duration {0:?}; write it like 24h, 90m, 30s, 7d or 1h30m")]
    Syntax(String),
}

impl Span {
    /// Wraps a positive [`Duration`]; `None` for zero.
    pub fn new(d: Duration) -> Option<Self> {
        (!d.is_zero()).then_some(Self(d))
    }

    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }
}

impl FromStr for Span {
    type Err = SpanError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        if text.is_empty() {
            return Err(SpanError::Empty);
        }
        if text.starts_with('-') {
            return Err(SpanError::Negative(s.to_owned()));
        }
        let syntax = || SpanError::Syntax(s.to_owned());
        let mut total = Duration::ZERO;
        let mut rest = text;
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(syntax)?;
            if digits == 0 {
                return Err(syntax());
            }
            let value: u64 = rest[..digits].parse().map_err(|_| syntax())?;
            rest = &rest[digits..];
            let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
            let unit_secs = match &rest[..unit_len] {
                "ms" => None,
                "s" => Some(1),
                "m" => Some(60),
                "h" => Some(3600),
                "d" => Some(86_400),
                _ => return Err(syntax()),
            };
            let part = match unit_secs {
                None => Duration::from_millis(value),
                Some(mult) => Duration::from_secs(value.checked_mul(mult).ok_or_else(syntax)?),
            };
            total = total.checked_add(part).ok_or_else(syntax)?;
            rest = &rest[unit_len..];
        }
        Span::new(total).ok_or_else(|| SpanError::Zero(s.to_owned()))
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs();
        if self.0.subsec_millis() != 0 || secs == 0 {
            return write!(f, "{}ms", self.0.as_millis());
        }
        let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
        for (v, u) in [(d, "d"), (h, "h"), (m, "m"), (s, "s")] {
            if v != 0 {
                write!(f, "{v}{u}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_compounds() {
        assert_eq!("24h".parse::<Span>().unwrap().get(), Duration::from_secs(86_400));
        assert_eq!("1h30m".parse::<Span>().unwrap().get(), Duration::from_secs(5400));
        assert_eq!("250ms".parse::<Span>().unwrap().get(), Duration::from_millis(250));
        assert_eq!("7d".parse::<Span>().unwrap().to_string(), "7d");
        assert_eq!("90m".parse::<Span>().unwrap().to_string(), "1h30m");
    }

    #[test]
    fn rejects_zero_negative_and_garbage() {
        assert!(matches!("0s".parse::<Span>(), Err(SpanError::Zero(_))));
        assert!(matches!("-1h".parse::<Span>(), Err(SpanError::Negative(_))));
        assert!(matches!("".parse::<Span>(), Err(SpanError::Empty)));
        for bad in ["h", "12", "1x", "1.5h", "99999999999999999999d"] {
            assert!(matches!(bad.parse::<Span>(), Err(SpanError::Syntax(_))), "{bad}");
        }
    }
}
