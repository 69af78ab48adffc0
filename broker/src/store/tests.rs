//! Migrations: a database made by the previous release (`testdata/release-0.1.sql`,
//! dumped from one that release made and used: agents enrolled and deregistered, plugins
//! published, jobs and commands run, one left waiting for an agent; only the plugin
//! components are cut to a few bytes) opens, keeps everything, and ends with the same
//! schema as a new database.

use std::collections::BTreeMap;

use super::*;
use crate::server::SCHEMAS;

fn temp_db(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("drover-store-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("drover.db")
}

/// A column: name, type, not null, default, primary key position.
type Column = (String, String, bool, Option<String>, i64);

/// Each table's columns.
fn schema_of(conn: &Connection) -> BTreeMap<String, Vec<Column>> {
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' AND name NOT LIKE 'schema\\_%' ESCAPE '\\' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    tables
        .into_iter()
        .map(|t| {
            let cols = conn
                .prepare(&format!("PRAGMA table_info({t})"))
                .unwrap()
                .query_map([], |r| {
                    Ok((r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
                })
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            (t, cols)
        })
        .collect()
}

fn indexes_of(conn: &Connection) -> Vec<String> {
    conn.prepare(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL ORDER BY name",
    )
    .unwrap()
    .query_map([], |r| r.get(0))
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

#[tokio::test]
async fn a_database_made_by_the_previous_release_is_migrated_and_keeps_everything() {
    let path = temp_db("previous-release");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(include_str!("testdata/release-0.1.sql"))
            .unwrap();
    }
    let db = Db::open(&path).unwrap();
    db.migrate(&SCHEMAS).await.unwrap();

    // Every capability is at its newest migration.
    let versions = db.schema_versions(&SCHEMAS).await.unwrap();
    for (schema, (name, version)) in SCHEMAS.iter().zip(&versions) {
        assert_eq!(name, schema.name);
        assert_eq!(*version as usize, schema.migrations.len(), "{name}");
    }

    // What the release stored is all there, read through today's store modules.
    let agents = crate::fleet::store::agents(&db).await.unwrap();
    let ids: Vec<&str> = agents.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, ["fix-1", "fix-2"]);
    // Its tags are its activation's now, and what it said of itself is kept as labels.
    assert_eq!(agents[0].tags["env"], "test");
    assert_eq!(agents[0].labels["env"], "test");
    assert!(agents[1].tags.is_empty() && agents[1].labels.is_empty());
    assert!(agents[1].deregistered_ms.is_some());
    assert!(
        crate::fleet::store::signing_key_of(&db, "fix-1")
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        crate::fleet::store::activations(&db).await.unwrap().len(),
        3
    );
    let logins = crate::fleet::store::agent_broker_logins(&db).await.unwrap();
    assert_eq!(
        logins.len(),
        1,
        "fix-2's credential went with its deregistration"
    );

    let plugins = crate::plugins::store::list(&db).await.unwrap();
    let names: Vec<&str> = plugins.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["command", "misbehave"]);

    let jobs = crate::jobs::store::jobs(&db, None, 100).await.unwrap();
    assert_eq!(jobs.len(), 5);
    // A job learnt its plugin's world from the catalogue.
    assert!(jobs.iter().all(|j| j.world == "task"));
    let echo = jobs
        .iter()
        .find(|j| j.plugin == "misbehave" && j.input["mode"] == "echo")
        .unwrap();
    let targets = crate::jobs::store::targets(&db, &echo.id, 0).await.unwrap();
    let result = targets[0].result.as_ref().unwrap();
    assert_eq!(result.output.as_ref().unwrap()["echo"]["value"], "hello");
    assert_eq!(targets[0].state, crate::jobs::TargetState::Success);
    // The command left for an agent that was away still waits for it, envelope kept.
    let waiting = jobs.iter().find(|j| j.input["argv"][1] == "later").unwrap();
    let t = &crate::jobs::store::targets(&db, &waiting.id, 0)
        .await
        .unwrap()[0];
    assert_eq!(t.state, crate::jobs::TargetState::Pending);
    assert!(
        crate::jobs::store::rollout(&db, &waiting.id)
            .await
            .unwrap()
            .is_some()
    );

    let audit = crate::audit::store::read(
        &db,
        &crate::audit::AuditFilter {
            limit: 1000,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(audit.iter().any(|e| e.action == "job.execute"));
    assert!(audit.iter().any(|e| e.action == "plugin.publish"));
    assert!(
        crate::fleet::store::agent_events(&db, None, 100)
            .await
            .is_ok()
    );

    // Migrating again changes nothing.
    db.migrate(&SCHEMAS).await.unwrap();
    assert_eq!(db.schema_versions(&SCHEMAS).await.unwrap(), versions);

    // And the schema is what a new database gets.
    let fresh = Db::in_memory().unwrap();
    fresh.migrate(&SCHEMAS).await.unwrap();
    let (old, new) = (db.conn().await, fresh.conn().await);
    assert_eq!(schema_of(&old), schema_of(&new));
    assert_eq!(indexes_of(&old), indexes_of(&new));
    drop((old, new));
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[tokio::test]
async fn a_database_from_an_older_build_of_the_previous_release_gets_its_missing_columns() {
    let path = temp_db("older-build");
    {
        // Release 0.1 as first shipped: job targets without the columns it added later.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE jobs (id TEXT PRIMARY KEY, plugin TEXT NOT NULL, version INTEGER NOT NULL, targets TEXT NOT NULL, input TEXT NOT NULL, created_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL);
             CREATE TABLE job_targets (job_id TEXT NOT NULL REFERENCES jobs(id), agent_id TEXT NOT NULL, attempt INTEGER NOT NULL, status TEXT NOT NULL, result TEXT, updated_ms INTEGER NOT NULL, PRIMARY KEY (job_id, agent_id));
             INSERT INTO jobs VALUES ('j1', 'p', 1, 'all', '{}', 1, 2);
             INSERT INTO job_targets VALUES ('j1', 'a', 1, 'succeeded', NULL, 1);
             INSERT INTO job_targets VALUES ('j1', 'b', 1, 'sent', NULL, 1);",
        )
        .unwrap();
    }
    let db = Db::open(&path).unwrap();
    db.migrate(&SCHEMAS).await.unwrap();
    let targets = crate::jobs::store::targets(&db, "j1", 0).await.unwrap();
    let states: Vec<_> = targets.iter().map(|t| t.state).collect();
    // The state each status implied.
    assert_eq!(
        states,
        [
            crate::jobs::TargetState::Success,
            crate::jobs::TargetState::Delivered
        ]
    );
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[tokio::test]
async fn a_failed_transaction_leaves_nothing_behind() {
    let db = Db::in_memory().unwrap();
    db.migrate(&SCHEMAS).await.unwrap();
    {
        let tx = db.begin().await.unwrap();
        tx.execute_batch("INSERT INTO audit (at_ms, actor, action, target, outcome, detail) VALUES (1, 'a', 'b', 'c', 'd', 'e')")
            .unwrap();
        // Dropped without a commit.
    }
    let n: i64 = db
        .conn()
        .await
        .query_row("SELECT COUNT(*) FROM audit", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);
}
