//! `.env` files (`KEY=VALUE` lines) as the original platform's org import read them
//! into workspace secrets.

use std::collections::BTreeMap;

/// Parses `KEY=VALUE` lines: blank lines and `#` comments skipped, an `export ` prefix
/// allowed, one pair of matching quotes around the value removed. A line that is not
/// a pair fails, naming `origin` and the line (never the value).
pub fn parse(text: &str, origin: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!("{origin}:{}: expected KEY=VALUE", index + 1));
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("{origin}:{}: {key:?} is not a variable name", index + 1));
        }
        let value = value.trim();
        let unquoted = ['"', '\'']
            .iter()
            .find_map(|q| value.strip_prefix(*q).and_then(|v| v.strip_suffix(*q)).filter(|_| value.len() >= 2))
            .unwrap_or(value);
        out.insert(key.to_string(), unquoted.to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_comments_exports_and_quotes() {
        let text = "# keys\nA=1\nexport B = \"two words\"\n\nC='x=y'\nD=\n";
        let env = parse(text, ".env").unwrap();
        assert_eq!(env["A"], "1");
        assert_eq!(env["B"], "two words");
        assert_eq!(env["C"], "x=y");
        assert_eq!(env["D"], "");
        assert_eq!(parse("A=1\nnot a pair\n", "org/.env").unwrap_err(), "org/.env:2: expected KEY=VALUE");
        assert!(parse("BAD KEY=1", ".env").unwrap_err().contains("not a variable name"));
    }
}
