-- Published plugins and their components, as release 0.1 left them.
CREATE TABLE IF NOT EXISTS blobs (
    sha256 TEXT PRIMARY KEY,
    bytes BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS plugins (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    length INTEGER NOT NULL,
    world TEXT NOT NULL,
    manifest TEXT NOT NULL,
    published_ms INTEGER NOT NULL,
    PRIMARY KEY (name, version)
);
