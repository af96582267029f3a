//! Rebuilds the crate when a migration is added, so `sqlx::migrate!` and the SQLite list
//! embed it.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
