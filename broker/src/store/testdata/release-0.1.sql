PRAGMA foreign_keys=OFF;
BEGIN TRANSACTION;
CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL DEFAULT '',
    os TEXT NOT NULL DEFAULT '',
    os_version TEXT NOT NULL DEFAULT '',
    arch TEXT NOT NULL DEFAULT '',
    agent_version TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL DEFAULT '{}',
    online INTEGER NOT NULL DEFAULT 0,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    status_changed_ms INTEGER NOT NULL,
    deregistered_ms INTEGER
);
INSERT INTO agents VALUES('fix-1','vm','linux','Debian GNU/Linux 12','x86_64','0.1.0','{"env":"test"}',0,1796616555539,1796616566782,1796616566837,NULL);
INSERT INTO agents VALUES('fix-2','','','','','','{}',0,1796616563606,0,1796616563606,1796616563606);
CREATE TABLE broker_users (
    username TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    salt BLOB NOT NULL,
    hash BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    mosquitto_hash TEXT
);
INSERT INTO broker_users VALUES('fix-1','agent',X'210559371ff1c6c145aa132e6efe6278',X'ee15345c3a6c054641ad566d6df8403b0d8d06b07009fdd0cd1b9dcc2904a552',1796616555331,'$7$101$Vb9jVXZEuGTFaVX7$Eh3+ev8+o2bPnv1jTgBu9sdV3vzEBl/BtyhVC5zvAU+ieqOPKqBcmYbQ2bD/ZxjFV2ld9yZHsjQDkRvqmfx5kg==');
CREATE TABLE blobs (
    sha256 TEXT PRIMARY KEY,
    bytes BLOB NOT NULL
);
INSERT INTO blobs VALUES('1c43c7d1c6ab44c0ba76393cf808ebb33f97fab1f2912f146d6fccf3afff3ce4',X'0061736d');
INSERT INTO blobs VALUES('a7435b687785a7b115c9d698a2a0a1b1152ef36f327b575cdac9f10185e526cf',X'0061736d');
CREATE TABLE plugins (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    length INTEGER NOT NULL,
    world TEXT NOT NULL,
    manifest TEXT NOT NULL,
    published_ms INTEGER NOT NULL,
    PRIMARY KEY (name, version)
);
INSERT INTO plugins VALUES('misbehave',1,'1c43c7d1c6ab44c0ba76393cf808ebb33f97fab1f2912f146d6fccf3afff3ce4',201789,'task','{"payload":"{\"name\":\"misbehave\",\"version\":1,\"sha256\":\"1c43c7d1c6ab44c0ba76393cf808ebb33f97fab1f2912f146d6fccf3afff3ce4\",\"length\":201789,\"world\":\"task\",\"capabilities\":{},\"issued_at\":1796616558,\"expires_at\":1804392558}","signatures":[{"key":"ca64c252afcdb535a4237115253eca6bbcca3833cfca9bb7967838128f7eef64","signature":"eOmoiRX1Xg83k41GVKRLVkSvCgou7ojnm/JnIgcNy7twm0gS5IG/artn/ruDJykrsYz5B21PDvAaDsHptubUAg=="}]}',1796616558520);
INSERT INTO plugins VALUES('command',1,'a7435b687785a7b115c9d698a2a0a1b1152ef36f327b575cdac9f10185e526cf',110174,'task','{"payload":"{\"name\":\"command\",\"version\":1,\"sha256\":\"a7435b687785a7b115c9d698a2a0a1b1152ef36f327b575cdac9f10185e526cf\",\"length\":110174,\"world\":\"task\",\"capabilities\":{\"exec\":[\"*\"]},\"issued_at\":1796616558,\"expires_at\":1804392558}","signatures":[{"key":"ca64c252afcdb535a4237115253eca6bbcca3833cfca9bb7967838128f7eef64","signature":"nnSsB0I/6Haa5P/ymJ7rvie6OH0T/Y4XbMUePwM1o3Ybat+/M5Cvf1lZwsbzLrmkhKB5FhMs6U5fLcufpAtoCw=="}]}',1796616558579);
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    plugin TEXT NOT NULL,
    version INTEGER NOT NULL,
    targets TEXT NOT NULL,
    input TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
INSERT INTO jobs VALUES('1a24eb11817-6e9f52a15ca6','misbehave',1,'fix-1','{"mode":"echo","value":"hello"}',1796616558615,1796617158615);
INSERT INTO jobs VALUES('1a24eb124cb-0636661ae864','command',1,'fix-1','{"argv":["/bin/echo","fixture"],"stream":true}',1796616561867,1796617161867);
INSERT INTO jobs VALUES('1a24eb13743-c5f17871f4a7','command',1,'fix-1','{"argv":["/bin/false"],"stream":true}',1796616566595,1796617166595);
INSERT INTO jobs VALUES('1a24eb137c6-04a097032ee3','misbehave',1,'fix-1','{"mode":"fail"}',1796616566726,1796617166726);
INSERT INTO jobs VALUES('1a24eb13c3a-5b97fb20dbc8','command',1,'fix-1','{"argv":["/bin/echo","later"],"stream":true}',1796616567866,1796620167866);
CREATE TABLE job_targets (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    agent_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    status TEXT NOT NULL,
    result TEXT,
    updated_ms INTEGER NOT NULL, state TEXT NOT NULL DEFAULT 'pending', detail TEXT, dispatched_ms INTEGER, started_ms INTEGER, finished_ms INTEGER, envelope BLOB, cancel_ms INTEGER,
    PRIMARY KEY (job_id, agent_id)
);
INSERT INTO job_targets VALUES('1a24eb11817-6e9f52a15ca6','fix-1',1,'succeeded','{"job_id":"1a24eb11817-6e9f52a15ca6","agent_id":"fix-1","attempt":1,"plugin":"misbehave","plugin_version":1,"status":"succeeded","failure":null,"output":{"echo":{"mode":"echo","value":"hello"}},"stdout":{"text":"","total_bytes":0,"truncated":false},"stderr":{"text":"","total_bytes":0,"truncated":false},"started_at_ms":1796616558626,"duration_ms":3152,"timings":{"fetch_ms":21,"load_ms":3125,"compile_cached":false,"run_ms":2}}',1796616561803,'success',NULL,1796616558616,1796616558833,1796616561803,NULL,NULL);
INSERT INTO job_targets VALUES('1a24eb124cb-0636661ae864','fix-1',1,'succeeded','{"job_id":"1a24eb124cb-0636661ae864","agent_id":"fix-1","attempt":1,"plugin":"command","plugin_version":1,"status":"succeeded","failure":null,"output":{"exit_code":0,"stderr":{"text":"","total_bytes":0,"truncated":false},"stdout":{"text":"fixture\n","total_bytes":8,"truncated":false}},"stdout":{"text":"","total_bytes":0,"truncated":false},"stderr":{"text":"","total_bytes":0,"truncated":false},"started_at_ms":1796616561885,"duration_ms":1619,"timings":{"fetch_ms":24,"load_ms":1565,"compile_cached":false,"run_ms":4}}',1796616563508,'success',NULL,1796616561867,1796616562096,1796616563508,NULL,NULL);
INSERT INTO job_targets VALUES('1a24eb13743-c5f17871f4a7','fix-1',1,'succeeded','{"job_id":"1a24eb13743-c5f17871f4a7","agent_id":"fix-1","attempt":1,"plugin":"command","plugin_version":1,"status":"succeeded","failure":null,"output":{"exit_code":1,"stderr":{"text":"","total_bytes":0,"truncated":false},"stdout":{"text":"","total_bytes":0,"truncated":false}},"stdout":{"text":"","total_bytes":0,"truncated":false},"stderr":{"text":"","total_bytes":0,"truncated":false},"started_at_ms":1796616566613,"duration_ms":42,"timings":{"fetch_ms":0,"load_ms":0,"compile_cached":true,"run_ms":23}}',1796616566682,'failed','exit code 1',1796616566595,NULL,1796616566682,NULL,NULL);
INSERT INTO job_targets VALUES('1a24eb137c6-04a097032ee3','fix-1',1,'failed','{"job_id":"1a24eb137c6-04a097032ee3","agent_id":"fix-1","attempt":1,"plugin":"misbehave","plugin_version":1,"status":"failed","failure":{"kind":"plugin_error","message":"asked to fail","retryable":true},"output":null,"stdout":{"text":"","total_bytes":0,"truncated":false},"stderr":{"text":"","total_bytes":0,"truncated":false},"started_at_ms":1796616566737,"duration_ms":30,"timings":{"fetch_ms":0,"load_ms":0,"compile_cached":true,"run_ms":1}}',1796616566782,'failed','asked to fail',1796616566727,NULL,1796616566782,NULL,NULL);
INSERT INTO job_targets VALUES('1a24eb13c3a-5b97fb20dbc8','fix-1',1,'pending',NULL,1796616567866,'pending',NULL,NULL,NULL,NULL,NULL,NULL);
CREATE TABLE rollouts (
    job_id TEXT PRIMARY KEY REFERENCES jobs(id),
    spec TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    cancelled_ms INTEGER,
    done_ms INTEGER
);
INSERT INTO rollouts VALUES('1a24eb124cb-0636661ae864','{"policy":{"max_concurrency":{"count":1},"max_errors":null,"ramp":"none","delivery_timeout_ms":600000,"run_timeout_ms":600000},"limits":{"timeout_ms":600000,"memory_bytes":268435456,"output_bytes":1048576},"parameters":{},"secret_names":[]}',1796616561867,NULL,1796616563513);
INSERT INTO rollouts VALUES('1a24eb13743-c5f17871f4a7','{"policy":{"max_concurrency":null,"max_errors":null,"ramp":"none","delivery_timeout_ms":600000,"run_timeout_ms":600000},"limits":{"timeout_ms":600000,"memory_bytes":268435456,"output_bytes":1048576},"parameters":{},"secret_names":[]}',1796616566595,NULL,1796616566683);
INSERT INTO rollouts VALUES('1a24eb13c3a-5b97fb20dbc8','{"policy":{"max_concurrency":null,"max_errors":null,"ramp":"none","delivery_timeout_ms":3600000,"run_timeout_ms":600000},"limits":{"timeout_ms":600000,"memory_bytes":268435456,"output_bytes":1048576},"parameters":{},"secret_names":[]}',1796616567866,NULL,NULL);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    agent_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
INSERT INTO events VALUES(1,1796616563607,'fix-2','deregistered','status message refused: agent fix-2 is deregistered; presence ignored');
CREATE TABLE activations (
    id TEXT PRIMARY KEY,
    salt BLOB NOT NULL,
    code_hash BLOB NOT NULL,
    agent_id TEXT,
    tags TEXT NOT NULL DEFAULT '{}',
    max_uses INTEGER NOT NULL,
    uses INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
INSERT INTO activations VALUES('act-d5ca89957df186e1',X'8ef28ad88617867176f7e8944841aee6',X'9a56663acdc8089fc8b407dce39be9c47522b47e6f8fddb362cf5bef9232b822','fix-1','{"env":"test"}',1,1,1796616555344,1796702955344,NULL);
INSERT INTO activations VALUES('act-61b554756b8530bc',X'c9b8fa3920621abd6ebbaf50f56f1394',X'1821e36019f76bdc3ed5c3474e27cc67c78d441304feaa4f7de2a10472c49aff','fix-2','{}',1,0,1796616555372,1796702955372,NULL);
INSERT INTO activations VALUES('act-c559a9b00af6731f',X'e1a3fbe91e324b7f23d4a68406ca89a3',X'5931f9f5f36307787e725f862d903c39f34670b30b2eb1c86e0502ba67cd8352',NULL,'{"env":"test"}',5,0,1796616563582,1796702963582,NULL);
CREATE TABLE agent_keys (
    agent_id TEXT PRIMARY KEY,
    signing_key TEXT NOT NULL,
    sealing_key TEXT NOT NULL,
    activation_id TEXT NOT NULL,
    enrolled_ms INTEGER NOT NULL
);
INSERT INTO agent_keys VALUES('fix-1','05c98356646cda99eb5dae4a5c1faa7c68b6ad09a04a1f0b97c4b1930160a2e8','6a5eee821548f2727dd596aa8fd51cba36f2b250856cd80943cd6778f97ea170','act-d5ca89957df186e1',1796616555527);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
INSERT INTO audit VALUES(1,1796616555331,'operator','agent.credentials','fix-1','ok','broker credential minted');
INSERT INTO audit VALUES(2,1796616555344,'operator','activation.create','act-d5ca89957df186e1','ok','max uses 1, expires in 86400 s');
INSERT INTO audit VALUES(3,1796616555367,'operator','agent.credentials','fix-2','ok','broker credential minted');
INSERT INTO audit VALUES(4,1796616555372,'operator','activation.create','act-61b554756b8530bc','ok','max uses 1, expires in 86400 s');
INSERT INTO audit VALUES(5,1796616555527,'enroll:act-d5ca89957df186e1','agent.enroll','fix-1','ok','signing key 05c98356646cda99');
INSERT INTO audit VALUES(6,1796616558522,'operator','plugin.publish','misbehave v1','ok','sha256 1c43c7d1c6ab44c0ba76393cf808ebb33f97fab1f2912f146d6fccf3afff3ce4');
INSERT INTO audit VALUES(7,1796616558580,'operator','plugin.publish','command v1','ok','sha256 a7435b687785a7b115c9d698a2a0a1b1152ef36f327b575cdac9f10185e526cf');
INSERT INTO audit VALUES(8,1796616558616,'operator','job.create','1a24eb11817-6e9f52a15ca6','ok','misbehave on fix-1: 1 agent(s)');
INSERT INTO audit VALUES(9,1796616561803,'agent:fix-1','job.execute','1a24eb11817-6e9f52a15ca6','succeeded','misbehave v1');
INSERT INTO audit VALUES(10,1796616561867,'operator','command.create','1a24eb124cb-0636661ae864','ok','["/bin/echo", "fixture"] on fix-1: 1 agent(s)');
INSERT INTO audit VALUES(11,1796616563508,'agent:fix-1','job.execute','1a24eb124cb-0636661ae864','succeeded','command v1');
INSERT INTO audit VALUES(12,1796616563553,'operator','command.create','["/bin/false"] on fix-1,fix-2','refused','agent "fix-2" is unknown');
INSERT INTO audit VALUES(13,1796616563582,'operator','activation.create','act-c559a9b00af6731f','ok','max uses 5, expires in 86400 s');
INSERT INTO audit VALUES(14,1796616566595,'operator','command.create','1a24eb13743-c5f17871f4a7','ok','["/bin/false"] on fix-1: 1 agent(s)');
INSERT INTO audit VALUES(15,1796616566682,'agent:fix-1','job.execute','1a24eb13743-c5f17871f4a7','succeeded','command v1');
INSERT INTO audit VALUES(16,1796616566727,'operator','job.create','1a24eb137c6-04a097032ee3','ok','misbehave on fix-1: 1 agent(s)');
INSERT INTO audit VALUES(17,1796616566782,'agent:fix-1','job.execute','1a24eb137c6-04a097032ee3','failed','misbehave v1: PluginError: asked to fail');
INSERT INTO audit VALUES(18,1796616567866,'operator','command.create','1a24eb13c3a-5b97fb20dbc8','ok','["/bin/echo", "later"] on fix-1: 1 agent(s)');
DELETE FROM sqlite_sequence;
INSERT INTO sqlite_sequence VALUES('audit',18);
INSERT INTO sqlite_sequence VALUES('events',1);
CREATE INDEX job_targets_unanswered ON job_targets(agent_id) WHERE envelope IS NOT NULL;
CREATE INDEX job_targets_cancelling ON job_targets(agent_id) WHERE cancel_ms IS NOT NULL;
COMMIT;
