//! Read-model tables beside the log: what projections write, in the store's own database, so
//! that a projection's rows and its checkpoint commit in one transaction.
//!
//! Projections speak one small dialect that PostgreSQL and SQLite both understand: `?`
//! placeholders (rewritten to `$1, $2, …` for PostgreSQL), integer, text and UUID values only
//! (times as microseconds), `INSERT … ON CONFLICT … DO UPDATE/NOTHING`, aggregates cast to
//! `BIGINT`, and text columns declared `COLLATE "binary"` (bytewise: SQLite's own collation,
//! and one of that name with the locale `C` that a PostgreSQL migration creates).
//!
//! A column that always holds a UUID may be declared `UUID`. PostgreSQL stores its 16 bytes,
//! which it compares and sorts as fixed-width values (in `psql`, keys and indexes over UUIDs
//! built in 0.45 – 0.92 of the time they took over the same ids as text). SQLite stores the
//! lowercase hyphenated text: a declared type `UUID` has NUMERIC affinity, which leaves text
//! that is not a number as it is, and a UUID's text never is. Both sort alike: a UUID's bytes
//! and its lowercase text compare in the same order. Values for such a column are bound as
//! [`SqlValue::Uuid`] (a PostgreSQL `uuid` is not comparable with `text`), and both stores
//! read them back as [`SqlValue::Text`].
//!
//! Many rows go to a table as one [`Rows`] write rather than as statements: PostgreSQL receives
//! each column as one array (`INSERT … SELECT * FROM UNNEST(…)`: one short statement to parse,
//! whatever the number of rows), or plain rows of a rebuild as `COPY … FROM STDIN`; SQLite
//! runs one prepared statement per row.

use uuid::Uuid;

/// A value bound to or read from a read-model statement.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SqlValue {
    /// A 64-bit integer (counts, positions, times in microseconds).
    Int(i64),
    /// Text (names, and ids of columns declared as text).
    Text(String),
    /// An id for a column declared `UUID` (bound only: reads return such a column as text).
    Uuid(Uuid),
}

impl SqlValue {
    /// The integer, or 0 for text or a UUID.
    pub fn int(&self) -> i64 {
        match self {
            SqlValue::Int(value) => *value,
            SqlValue::Text(_) | SqlValue::Uuid(_) => 0,
        }
    }

    /// The text, or the integer or UUID as text.
    pub fn text(&self) -> String {
        match self {
            SqlValue::Int(value) => value.to_string(),
            SqlValue::Text(text) => text.clone(),
            SqlValue::Uuid(id) => id.to_string(),
        }
    }
}

impl From<Uuid> for SqlValue {
    fn from(value: Uuid) -> Self {
        SqlValue::Uuid(value)
    }
}

impl From<i64> for SqlValue {
    fn from(value: i64) -> Self {
        SqlValue::Int(value)
    }
}

impl From<&str> for SqlValue {
    fn from(value: &str) -> Self {
        SqlValue::Text(value.to_string())
    }
}

impl From<String> for SqlValue {
    fn from(value: String) -> Self {
        SqlValue::Text(value)
    }
}

/// One statement and its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// SQL with `?` placeholders.
    pub sql: String,
    /// One value per placeholder, in order.
    pub params: Vec<SqlValue>,
}

impl Statement {
    /// A statement.
    pub fn new(sql: impl Into<String>, params: Vec<SqlValue>) -> Self {
        Statement {
            sql: sql.into(),
            params,
        }
    }

    /// True for a `SELECT`: as a fence of [`crate::EventStore::read_model_commit`] it checks a
    /// row and holds it, where any other statement changes one.
    pub fn is_check(&self) -> bool {
        self.sql
            .split_whitespace()
            .next()
            .is_some_and(|word| word.eq_ignore_ascii_case("SELECT"))
    }
}

/// The values of one column of [`Rows`], all of one kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Column {
    /// Integers.
    Int(Vec<i64>),
    /// Text.
    Text(Vec<String>),
    /// UUIDs (for a column declared `UUID`).
    Uuid(Vec<Uuid>),
}

impl Column {
    /// Rows it holds.
    pub fn len(&self) -> usize {
        match self {
            Column::Int(values) => values.len(),
            Column::Text(values) => values.len(),
            Column::Uuid(values) => values.len(),
        }
    }

    /// True when it holds no row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Rows for one table: `INSERT INTO table (columns) VALUES (…), (…) on_conflict`, column by
/// column. Names come from the projection's code, never from input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rows {
    /// The table's physical name.
    pub table: String,
    /// Column names, in the order of `values`.
    pub columns: Vec<&'static str>,
    /// What a row whose key exists does: `ON CONFLICT (…) DO …`; empty for plain rows (a
    /// rebuild loading a table before its key), which PostgreSQL takes in with `COPY`.
    pub on_conflict: String,
    /// One entry per column, each as long as the others.
    pub values: Vec<Column>,
}

impl Rows {
    /// Rows it holds (checked: every column as long as the first).
    pub fn checked_len(&self) -> Result<usize, crate::StoreError> {
        let len = self.values.first().map_or(0, Column::len);
        if self.values.len() != self.columns.len() || self.values.iter().any(|c| c.len() != len) {
            return Err(crate::StoreError::Invalid(format!(
                "rows for {}: {} columns named, {} given, or of unequal lengths",
                self.table,
                self.columns.len(),
                self.values.len()
            )));
        }
        Ok(len)
    }
}

/// One write of a read-model commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// A statement (or, without parameters, a script of statements separated by `;`).
    Sql(Statement),
    /// Rows for one table.
    Rows(Rows),
}

impl From<Statement> for Write {
    fn from(statement: Statement) -> Self {
        Write::Sql(statement)
    }
}

impl From<Rows> for Write {
    fn from(rows: Rows) -> Self {
        Write::Rows(rows)
    }
}

/// `?` placeholders as PostgreSQL's `$1, $2, …` (read-model SQL never has `?` in literals).
pub fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn placeholders_are_numbered_in_order() {
        assert_eq!(
            super::numbered("SELECT a FROM t WHERE b = ? AND c IN (?, ?)"),
            "SELECT a FROM t WHERE b = $1 AND c IN ($2, $3)"
        );
    }
}
