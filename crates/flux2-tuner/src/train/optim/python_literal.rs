//! The subset of Python's `ast.literal_eval` that Musubi applies to each `--optimizer_args`
//! value: numbers, `True`/`False`/`None`, strings, tuples and lists (a bare `0.9,0.999` is a
//! tuple, as in Python). `Display` writes a value as Python's `str()` does, which is how Musubi
//! puts the arguments into the `ss_optimizer` metadata.

use std::fmt;

/// A parsed Python literal.
#[derive(Debug, Clone, PartialEq)]
pub enum PythonValue {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<PythonValue>),
    List(Vec<PythonValue>),
}

/// Parses one literal; the error says what was not understood.
pub fn parse_python_literal(text: &str) -> std::result::Result<PythonValue, String> {
    let mut parser = Parser {
        characters: text.chars().collect(),
        position: 0,
    };
    parser.skip_whitespace();
    if parser.at_end() {
        return Err("an empty value is not a Python literal".into());
    }
    let first = parser.value()?;
    parser.skip_whitespace();
    // `a, b` without brackets is a tuple in Python.
    let value = if parser.peek() == Some(',') {
        let mut items = vec![first];
        while parser.peek() == Some(',') {
            parser.position += 1;
            parser.skip_whitespace();
            if parser.at_end() {
                break;
            }
            items.push(parser.value()?);
            parser.skip_whitespace();
        }
        PythonValue::Tuple(items)
    } else {
        first
    };
    parser.skip_whitespace();
    if !parser.at_end() {
        return Err(format!(
            "unexpected `{}` at character {}",
            parser.rest(),
            parser.position + 1
        ));
    }
    Ok(value)
}

struct Parser {
    characters: Vec<char>,
    position: usize,
}

impl Parser {
    fn at_end(&self) -> bool {
        self.position >= self.characters.len()
    }

    fn peek(&self) -> Option<char> {
        self.characters.get(self.position).copied()
    }

    fn rest(&self) -> String {
        self.characters[self.position..].iter().collect()
    }

    fn skip_whitespace(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.position += 1;
        }
    }

    fn value(&mut self) -> std::result::Result<PythonValue, String> {
        self.skip_whitespace();
        match self.peek() {
            None => Err("the value ends too early".into()),
            Some('(') => self.sequence(')').map(|(items, trailing_comma)| {
                // `(x)` is just x; `(x,)` and `()` are tuples.
                if items.len() == 1 && !trailing_comma {
                    items.into_iter().next().unwrap_or(PythonValue::None)
                } else {
                    PythonValue::Tuple(items)
                }
            }),
            Some('[') => self
                .sequence(']')
                .map(|(items, _)| PythonValue::List(items)),
            Some('\'') | Some('"') => self.string(),
            Some(c) if c == '-' || c == '+' => {
                self.position += 1;
                match self.value()? {
                    PythonValue::Int(i) => Ok(PythonValue::Int(if c == '-' { -i } else { i })),
                    PythonValue::Float(f) => Ok(PythonValue::Float(if c == '-' { -f } else { f })),
                    PythonValue::Bool(b) => Ok(PythonValue::Int(if c == '-' {
                        -(b as i64)
                    } else {
                        b as i64
                    })),
                    _ => Err(format!("`{c}` can only precede a number")),
                }
            }
            Some(c) if c.is_ascii_digit() || c == '.' => self.number(),
            Some(c) if c.is_alphabetic() || c == '_' => {
                let start = self.position;
                while self
                    .peek()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.')
                {
                    self.position += 1;
                }
                let word: String = self.characters[start..self.position].iter().collect();
                match word.as_str() {
                    "True" => Ok(PythonValue::Bool(true)),
                    "False" => Ok(PythonValue::Bool(false)),
                    "None" => Ok(PythonValue::None),
                    _ => Err(format!(
                        "`{word}` is not a literal (strings need quotes; booleans are True/False)"
                    )),
                }
            }
            Some(c) => Err(format!("`{c}` cannot start a Python literal")),
        }
    }

    /// Items up to `close`; also whether the last item had a trailing comma.
    fn sequence(&mut self, close: char) -> std::result::Result<(Vec<PythonValue>, bool), String> {
        self.position += 1;
        let mut items = Vec::new();
        let mut trailing_comma = false;
        loop {
            self.skip_whitespace();
            if self.peek() == Some(close) {
                self.position += 1;
                return Ok((items, trailing_comma));
            }
            items.push(self.value()?);
            self.skip_whitespace();
            match self.peek() {
                Some(',') => {
                    self.position += 1;
                    trailing_comma = true;
                }
                Some(c) if c == close => {
                    trailing_comma = false;
                }
                Some(c) => return Err(format!("expected `,` or `{close}`, found `{c}`")),
                None => return Err(format!("missing `{close}`")),
            }
        }
    }

    fn string(&mut self) -> std::result::Result<PythonValue, String> {
        let quote = self.characters[self.position];
        self.position += 1;
        let mut text = String::new();
        loop {
            match self.peek() {
                None => return Err(format!("the string misses its closing {quote}")),
                Some(c) if c == quote => {
                    self.position += 1;
                    return Ok(PythonValue::Str(text));
                }
                Some('\\') => {
                    self.position += 1;
                    let escaped = self.peek().ok_or("the string ends after `\\`")?;
                    self.position += 1;
                    text.push(match escaped {
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        '0' => '\0',
                        other => other,
                    });
                }
                Some(c) => {
                    self.position += 1;
                    text.push(c);
                }
            }
        }
    }

    fn number(&mut self) -> std::result::Result<PythonValue, String> {
        let start = self.position;
        while self.peek().is_some_and(|c| {
            c.is_ascii_alphanumeric()
                || c == '.'
                || c == '_'
                || ((c == '-' || c == '+')
                    && matches!(
                        self.characters.get(self.position.wrapping_sub(1)),
                        Some('e' | 'E')
                    )
                    && !self.characters[start..self.position]
                        .iter()
                        .any(|c| matches!(c, 'x' | 'X')))
        }) {
            self.position += 1;
        }
        let raw: String = self.characters[start..self.position].iter().collect();
        let text = raw.replace('_', "");
        let bad = || format!("`{raw}` is not a number");
        if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
            return i64::from_str_radix(hex, 16)
                .map(PythonValue::Int)
                .map_err(|_| bad());
        }
        let is_float = text.contains(['.', 'e', 'E']);
        if is_float {
            if text.contains(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E') {
                return Err(bad());
            }
            text.parse::<f64>()
                .map(PythonValue::Float)
                .map_err(|_| bad())
        } else {
            // Python rejects leading zeros in integers other than 0 itself.
            if text.len() > 1 && text.starts_with('0') && text.chars().any(|c| c != '0') {
                return Err(bad());
            }
            text.parse::<i64>().map(PythonValue::Int).map_err(|_| bad())
        }
    }
}

/// Python's `repr(float)`: the shortest round-trip digits, in exponent form below 1e-4 or from
/// 1e16 on, and always with a `.0` or an exponent.
pub fn python_float_repr(value: f64) -> String {
    if value.is_nan() {
        return "nan".into();
    }
    if value.is_infinite() {
        return if value > 0.0 { "inf" } else { "-inf" }.into();
    }
    if value == 0.0 {
        return if value.is_sign_negative() {
            "-0.0"
        } else {
            "0.0"
        }
        .into();
    }
    let scientific = format!("{value:e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if !(-4..16).contains(&exponent) {
        let sign = if exponent < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exponent.abs());
    }
    let text = format!("{value}");
    if text.contains('.') {
        text
    } else {
        format!("{text}.0")
    }
}

impl PythonValue {
    /// Python's `repr()`: strings in quotes (as inside a tuple or list).
    fn repr(&self) -> String {
        match self {
            PythonValue::Str(text) => {
                if text.contains('\'') && !text.contains('"') {
                    format!("\"{text}\"")
                } else {
                    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
                }
            }
            other => other.to_string(),
        }
    }

    /// The Python type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            PythonValue::None => "None",
            PythonValue::Bool(_) => "bool",
            PythonValue::Int(_) => "int",
            PythonValue::Float(_) => "float",
            PythonValue::Str(_) => "str",
            PythonValue::Tuple(_) => "tuple",
            PythonValue::List(_) => "list",
        }
    }
}

impl fmt::Display for PythonValue {
    /// Python's `str()`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join = |items: &[PythonValue]| {
            items
                .iter()
                .map(PythonValue::repr)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            PythonValue::None => write!(f, "None"),
            PythonValue::Bool(true) => write!(f, "True"),
            PythonValue::Bool(false) => write!(f, "False"),
            PythonValue::Int(i) => write!(f, "{i}"),
            PythonValue::Float(x) => write!(f, "{}", python_float_repr(*x)),
            PythonValue::Str(text) => write!(f, "{text}"),
            PythonValue::Tuple(items) if items.len() == 1 => write!(f, "({},)", items[0].repr()),
            PythonValue::Tuple(items) => write!(f, "({})", join(items)),
            PythonValue::List(items) => write!(f, "[{}]", join(items)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> PythonValue {
        match parse_python_literal(text) {
            Ok(value) => value,
            Err(message) => panic!("{text}: {message}"),
        }
    }

    #[test]
    fn parses_the_literals_musubi_users_pass() {
        assert_eq!(parse("0.01"), PythonValue::Float(0.01));
        assert_eq!(parse("1e-8"), PythonValue::Float(1e-8));
        assert_eq!(parse("-0.8"), PythonValue::Float(-0.8));
        assert_eq!(parse("4096"), PythonValue::Int(4096));
        assert_eq!(parse("1_000"), PythonValue::Int(1000));
        assert_eq!(parse("True"), PythonValue::Bool(true));
        assert_eq!(parse("None"), PythonValue::None);
        assert_eq!(parse("'abc'"), PythonValue::Str("abc".into()));
        assert_eq!(
            parse("(0.9,0.999)"),
            PythonValue::Tuple(vec![PythonValue::Float(0.9), PythonValue::Float(0.999)])
        );
        assert_eq!(
            parse(" 0.9, 0.99"),
            PythonValue::Tuple(vec![PythonValue::Float(0.9), PythonValue::Float(0.99)])
        );
        assert_eq!(
            parse("[1e-30, 1e-3]"),
            PythonValue::List(vec![PythonValue::Float(1e-30), PythonValue::Float(1e-3)])
        );
        assert_eq!(parse("(5)"), PythonValue::Int(5));
        assert_eq!(parse("(5,)"), PythonValue::Tuple(vec![PythonValue::Int(5)]));
        assert_eq!(parse("()"), PythonValue::Tuple(vec![]));
    }

    #[test]
    fn rejects_what_literal_eval_rejects() {
        for bad in [
            "",
            "true",
            "0.9.1",
            "(1, 2",
            "abc",
            "1 2",
            "08",
            "float('inf')",
        ] {
            assert!(parse_python_literal(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn writes_values_as_python_str() {
        assert_eq!(parse("0.01").to_string(), "0.01");
        assert_eq!(parse("1e-8").to_string(), "1e-08");
        assert_eq!(parse("0.0001").to_string(), "0.0001");
        assert_eq!(parse("0.00001").to_string(), "1e-05");
        assert_eq!(parse("1e16").to_string(), "1e+16");
        assert_eq!(parse("2.").to_string(), "2.0");
        assert_eq!(parse("(0.9,0.999)").to_string(), "(0.9, 0.999)");
        assert_eq!(parse("[1e-30, 1e-3]").to_string(), "[1e-30, 0.001]");
        assert_eq!(parse("('a', True, None)").to_string(), "('a', True, None)");
        assert_eq!(parse("'a'").to_string(), "a");
        assert_eq!(parse("(1,)").to_string(), "(1,)");
    }
}
