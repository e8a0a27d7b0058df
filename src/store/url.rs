//! What a `--database-url` names, decided in one place for every command (`up`,
//! `run`, `migrate`, `apply`): a Postgres server (`postgres://`, `postgresql://`) or a
//! SQLite file (`sqlite://PATH` or a plain path). Anything else is refused with the
//! accepted forms: a typo such as `postgress://` must not quietly become a SQLite file
//! named after it.
//!
//! Shown anywhere (errors, logs), a URL has its password replaced by `***`.

use std::fmt;
use std::path::{Path, PathBuf};

/// The accepted forms, as error messages name them.
pub const ACCEPTED: &str = "postgres://USER:PASSWORD@HOST/DB, postgresql://..., sqlite://PATH or a plain file path";

#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// The URL as given (passed to the driver as is).
    Postgres(String),
    Sqlite(PathBuf),
}

impl DatabaseUrl {
    /// Decides what `text` names, or says why it names nothing usable.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err(format!("the database URL is empty; use {ACCEPTED}"));
        }
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return Ok(Self::Postgres(text.to_string()));
        }
        if let Some(path) = text.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(format!("the database URL {text:?} names no file; use sqlite://PATH"));
            }
            return Ok(Self::Sqlite(PathBuf::from(path)));
        }
        // Anything that starts like a URL scheme (`word:`) is one we do not know, not a
        // file name: `postgress://...`, `mysql://...`, `postgres:host`. A file whose
        // name really looks like that can be written `./NAME`.
        if let Some((scheme, _)) = text.split_once(':')
            && !scheme.is_empty()
            && scheme.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && scheme.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        {
            let shown = Self::Postgres(text.to_string()).to_string();
            return Err(format!("the database URL {shown} has an unknown scheme {scheme:?}; use {ACCEPTED}"));
        }
        Ok(Self::Sqlite(PathBuf::from(text)))
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }

    /// The Postgres URL, if this is one (what the driver is given).
    pub fn postgres(&self) -> Option<&str> {
        match self {
            Self::Postgres(url) => Some(url),
            Self::Sqlite(_) => None,
        }
    }

    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            Self::Sqlite(path) => Some(path),
            Self::Postgres(_) => None,
        }
    }
}

/// The URL with its password (and any `password=` parameter) replaced by `***`.
impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "{}", path.display()),
            Self::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

/// Debug shows the same as Display: never the password.
impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({self})")
    }
}

fn redact(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        // Unparseable: show the scheme and host part only, never what might be a password.
        let scheme = url.split("://").next().unwrap_or_default();
        let host = url.rsplit_once('@').map_or("", |(_, rest)| rest);
        return format!("{scheme}://***@{host}");
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    }
    let query: Vec<(String, String)> = parsed
        .query_pairs()
        .map(|(k, v)| {
            let v = if k.eq_ignore_ascii_case("password") { "***".to_string() } else { v.into_owned() };
            (k.into_owned(), v)
        })
        .collect();
    if !query.is_empty() {
        parsed.query_pairs_mut().clear().extend_pairs(query);
    }
    parsed.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_forms() {
        assert!(DatabaseUrl::parse("postgres://u:p@h/db").unwrap().is_postgres());
        assert!(DatabaseUrl::parse("postgresql://h/db").unwrap().is_postgres());
        assert_eq!(DatabaseUrl::parse("sqlite:///var/s.db").unwrap().sqlite_path(), Some(Path::new("/var/s.db")));
        assert_eq!(DatabaseUrl::parse("sqlite://rel/s.db").unwrap().sqlite_path(), Some(Path::new("rel/s.db")));
        assert_eq!(DatabaseUrl::parse("/tmp/state.db").unwrap().sqlite_path(), Some(Path::new("/tmp/state.db")));
        assert_eq!(DatabaseUrl::parse("state.db").unwrap().sqlite_path(), Some(Path::new("state.db")));
        assert_eq!(DatabaseUrl::parse("./odd:name.db").unwrap().sqlite_path(), Some(Path::new("./odd:name.db")));
    }

    #[test]
    fn unknown_schemes_are_refused_with_the_accepted_forms_and_no_password() {
        for bad in ["postgress://u:hunter2@h/db", "mysql://h/db", "postgres:h", "sqlite:x.db", "sqlite://", ""] {
            let e = DatabaseUrl::parse(bad).unwrap_err();
            assert!(e.contains("sqlite://PATH"), "{bad}: {e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn shown_urls_hide_the_password() {
        let url = DatabaseUrl::parse("postgres://molecule:hunter2@db:5432/m?sslmode=require&password=hunter2").unwrap();
        let shown = url.to_string();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("molecule:***@db:5432/m") && shown.contains("sslmode=require"), "{shown}");
        assert!(!format!("{url:?}").contains("hunter2"));
        assert_eq!(DatabaseUrl::parse("postgres://h/db").unwrap().to_string(), "postgres://h/db");
    }
}
