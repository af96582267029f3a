//! Read-model rows on every store: rows written plainly (no conflict clause, as a rebuild
//! loads them) come back exactly, whatever their text and numbers hold, and a plain row whose
//! key is taken fails its whole commit; `UUID` columns take UUIDs, compare with bound UUIDs,
//! read back as text and sort as their text does.

use gatehouse_events::readmodel::{Column, Rows, SqlValue, Statement, Write};
use gatehouse_events::testing;
use uuid::Uuid;

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

#[tokio::test]
async fn uuid_columns_round_trip_compare_and_sort_as_their_text() -> Result<(), Error> {
    // Digits against letters at the same place, the extremes, and UUIDv7s of one millisecond.
    let ids: Vec<Uuid> = [
        "0a000000-0000-4000-8000-000000000000",
        "09ffffff-ffff-4fff-bfff-ffffffffffff",
        "00000000-0000-0000-0000-000000000000",
        "ffffffff-ffff-ffff-ffff-ffffffffffff",
        "0193a1b2-c3d4-7c4c-8a42-38a0b923820d",
        "0193a1b2-c3d4-7c4c-8a42-38a0b92382a0",
        "0193a1b2-c3d4-7c4d-8a42-38a0b9238200",
    ]
    .iter()
    .map(|text| Uuid::parse_str(text))
    .collect::<Result<_, _>>()?;
    let mut sorted: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    sorted.sort();
    for test in testing::all().await? {
        let store = test.store;
        let backend = store.backend();
        store
            .read_model_commit(
                None,
                vec![
                    Statement::new(
                        "CREATE TABLE uuid_rows (id UUID NOT NULL, n BIGINT NOT NULL);
                         CREATE UNIQUE INDEX uuid_rows_key ON uuid_rows (id)",
                        Vec::new(),
                    )
                    .into(),
                ],
            )
            .await?;
        let rows = |ids: &[Uuid], n: i64, on_conflict: &str| {
            Write::Rows(Rows {
                table: "uuid_rows".into(),
                columns: vec!["id", "n"],
                on_conflict: on_conflict.into(),
                values: vec![Column::Uuid(ids.to_vec()), Column::Int(vec![n; ids.len()])],
            })
        };
        // Plain rows (PostgreSQL: `COPY`), then upserts over some of them (`UNNEST`).
        assert!(
            store
                .read_model_commit(None, vec![rows(&ids, 1, "")])
                .await?
        );
        let upsert = "ON CONFLICT (id) DO UPDATE SET n = excluded.n";
        assert!(
            store
                .read_model_commit(None, vec![rows(&ids[..2], 2, upsert)])
                .await?
        );
        let read = store
            .read_model_query(Statement::new(
                "SELECT id, n FROM uuid_rows ORDER BY id",
                Vec::new(),
            ))
            .await?;
        let got: Vec<String> = read.iter().map(|row| row[0].text()).collect();
        assert_eq!(
            got, sorted,
            "{backend}: read back as text, in the text's order"
        );
        let n_of = |id: &Uuid| {
            read.iter()
                .find(|row| row[0] == SqlValue::Text(id.to_string()))
                .map(|row| row[1].int())
        };
        assert_eq!(n_of(&ids[0]), Some(2), "{backend}");
        assert_eq!(n_of(&ids[1]), Some(2), "{backend}");
        assert_eq!(n_of(&ids[2]), Some(1), "{backend}");

        // A bound UUID finds its row and orders against the others as its text does.
        let below = store
            .read_model_query(Statement::new(
                "SELECT CAST(COUNT(*) AS BIGINT) FROM uuid_rows WHERE id < ?",
                vec![ids[4].into()],
            ))
            .await?;
        let want = sorted.iter().filter(|t| **t < ids[4].to_string()).count() as i64;
        assert_eq!(below[0][0].int(), want, "{backend}");
        let found = store
            .read_model_query(Statement::new(
                "SELECT n FROM uuid_rows WHERE id = ?",
                vec![ids[6].into()],
            ))
            .await?;
        assert_eq!(found, vec![vec![SqlValue::Int(1)]], "{backend}");
    }
    Ok(())
}
