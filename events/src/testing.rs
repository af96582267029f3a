//! Stores for tests: SQLite always, PostgreSQL when `GATEHOUSE_TEST_DATABASE_URL` is set
//! (each call creates a fresh database on that server). With `CI=true` a missing
//! PostgreSQL URL is an error, not a silent skip.

use crate::envelope::{NewEvent, StreamId};
use crate::error::StoreError;
use crate::store::EventStore;
use sqlx::Connection;
use std::sync::Arc;
use tempfile::TempDir;
use uuid::Uuid;

/// A `Counted` event numbered `n` on `stream`: the store tests' event.
pub fn counted(tenant_id: Uuid, stream: &StreamId, n: u64) -> NewEvent {
    NewEvent {
        tenant_id,
        stream: stream.clone(),
        event_type: "Counted".into(),
        schema_version: 1,
        payload: serde_json::json!({ "n": n }),
    }
}

/// A store under test and how to reach it again (to reopen it, or from another process).
pub struct TestStore {
    /// The store.
    pub store: Arc<dyn EventStore>,
    /// `sqlite://PATH` or `postgres://…/DB`.
    pub url: String,
    /// Keeps the SQLite directory alive.
    pub dir: Option<TempDir>,
}

impl TestStore {
    /// The backend's name.
    pub fn backend(&self) -> &'static str {
        self.store.backend()
    }

    /// Opens the same database again (as a restarted process would).
    pub async fn reopen(&self) -> Result<Arc<dyn EventStore>, StoreError> {
        crate::store::connect(&self.url).await
    }
}

/// A fresh SQLite store in a temporary directory.
pub async fn sqlite() -> Result<TestStore, StoreError> {
    let dir = tempfile::tempdir().map_err(|e| StoreError::Backend(e.to_string()))?;
    let url = format!("sqlite://{}", dir.path().join("events.db").display());
    Ok(TestStore {
        store: crate::store::connect(&url).await?,
        url,
        dir: Some(dir),
    })
}

/// A fresh database on the test PostgreSQL server, if one is configured.
pub async fn fresh_postgres_url() -> Result<Option<String>, StoreError> {
    let base = match std::env::var("GATEHOUSE_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            return Err(StoreError::Backend(
                "CI=true but GATEHOUSE_TEST_DATABASE_URL is not set: PostgreSQL tests cannot be skipped in CI".into(),
            ));
        }
        _ => return Ok(None),
    };
    let name = format!("gh_test_{}", uuid::Uuid::new_v4().simple());
    create_database(&base, &name).await.map(Some)
}

/// Creates database `name` (letters, digits, `_`) on the server of `base` and returns its URL.
pub async fn create_database(base: &str, name: &str) -> Result<String, StoreError> {
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(StoreError::Invalid(format!("bad database name {name}")));
    }
    let mut admin = sqlx::PgConnection::connect(base).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await?;
    admin.close().await?;
    Ok(database_url(base, name))
}

/// Drops database `name` on the server of `base` (closing its connections).
pub async fn drop_database(base: &str, name: &str) -> Result<(), StoreError> {
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(StoreError::Invalid(format!("bad database name {name}")));
    }
    let mut admin = sqlx::PgConnection::connect(base).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    admin.close().await?;
    Ok(())
}

/// The URL of database `name` on the server of `base`.
pub fn database_url(base: &str, name: &str) -> String {
    let (without_query, query) = match base.split_once('?') {
        Some((url, query)) => (url, format!("?{query}")),
        None => (base, String::new()),
    };
    let server = match without_query.rsplit_once('/') {
        Some((server, _db)) if server.contains("://") && !server.ends_with('/') => server,
        _ => without_query.trim_end_matches('/'),
    };
    format!("{server}/{name}{query}")
}

/// A fresh PostgreSQL store, if the test server is configured.
pub async fn postgres() -> Result<Option<TestStore>, StoreError> {
    let Some(url) = fresh_postgres_url().await? else {
        return Ok(None);
    };
    Ok(Some(TestStore {
        store: crate::store::connect(&url).await?,
        url,
        dir: None,
    }))
}

/// Every backend available to this test run: SQLite, then PostgreSQL when configured.
pub async fn all() -> Result<Vec<TestStore>, StoreError> {
    let mut stores = vec![sqlite().await?];
    if let Some(pg) = postgres().await? {
        stores.push(pg);
    }
    Ok(stores)
}
