//! Read-model rows on every store: rows written plainly (no conflict clause, as a rebuild
//! loads them) come back exactly, whatever their text and numbers hold, and a plain row whose
//! key is taken fails its whole commit.

use gatehouse_events::readmodel::{Column, Rows, SqlValue, Statement, Write};
use gatehouse_events::testing;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::test]
async fn plain_rows_come_back_exactly_and_a_taken_key_changes_nothing() -> Result<(), Error> {
    for test in testing::all().await? {
        let store = test.store;
        store
            .read_model_commit(
                None,
                vec![
                    Statement::new(
                        "CREATE TABLE plain_rows (id TEXT NOT NULL, n BIGINT NOT NULL, \
                         note TEXT NOT NULL DEFAULT '');
                         CREATE UNIQUE INDEX plain_rows_key ON plain_rows (id)",
                        Vec::new(),
                    )
                    .into(),
                ],
            )
            .await?;
        // Separators, escapes and markers of SQL and of PostgreSQL's text formats, and text
        // that is not ASCII.
        let notes = [
            "tab\there",
            "line\nbreak",
            "carriage\rreturn",
            "back\\slash",
            "\\N",
            "\\.",
            "",
            "Zoë 東京 🔑",
        ];
        let ids: Vec<String> = (0..notes.len()).map(|i| format!("id{i}")).collect();
        let numbers: Vec<i64> = (0..notes.len() as i64)
            .map(|i| match i {
                0 => i64::MIN,
                1 => i64::MAX,
                i => -i,
            })
            .collect();
        let rows = |ids: Vec<String>, numbers: Vec<i64>, notes: Vec<String>| {
            Write::Rows(Rows {
                table: "plain_rows".into(),
                columns: vec!["id", "n", "note"],
                on_conflict: String::new(),
                values: vec![Column::Text(ids), Column::Int(numbers), Column::Text(notes)],
            })
        };
        let notes: Vec<String> = notes.iter().map(|n| n.to_string()).collect();
        assert!(
            store
                .read_model_commit(
                    None,
                    vec![rows(ids.clone(), numbers.clone(), notes.clone())]
                )
                .await?
        );
        let read = || {
            store.read_model_query(Statement::new(
                "SELECT id, n, note FROM plain_rows ORDER BY id",
                Vec::new(),
            ))
        };
        let want: Vec<Vec<SqlValue>> = (0..ids.len())
            .map(|i| {
                vec![
                    ids[i].clone().into(),
                    numbers[i].into(),
                    notes[i].clone().into(),
                ]
            })
            .collect();
        assert_eq!(read().await?, want, "{}", store.backend());

        // A new key and a taken one in one commit: refused, and the new one is not kept.
        let again = rows(
            vec!["id99".into(), "id3".into()],
            vec![1, 2],
            vec!["new".into(), "taken".into()],
        );
        let marker = Statement::new(
            "UPDATE plain_rows SET note = 'changed' WHERE id = 'id0'",
            Vec::new(),
        );
        assert!(
            store
                .read_model_commit(None, vec![marker.into(), again])
                .await
                .is_err(),
            "{}: a taken key was written",
            store.backend()
        );
        assert_eq!(read().await?, want, "{}", store.backend());
    }
    Ok(())
}
