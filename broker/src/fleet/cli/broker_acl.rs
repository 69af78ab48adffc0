//! `drover broker acl`: the files an external broker needs to authenticate every client
//! and confine every agent to its own topics, as the embedded broker does.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::cli::context::{Ctx, Output};
use crate::cli::print::print_json;
use crate::mqtt::auth::CONTROL_USER;
use crate::mqtt::mosquitto;
use crate::store::Db;

/// Broker commands.
#[derive(Debug, clap::Subcommand)]
pub enum BrokerCommand {
    /// Write an external broker's password file, ACL file and settings from the store:
    /// the control plane, and every agent with a credential that is not deregistered.
    Acl(AclArgs),
}

/// Broker configuration formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Mosquitto 2.0 or later: `passwd`, `acl`, `mosquitto.conf.snippet`.
    Mosquitto,
}

/// Flags of `drover broker acl`.
#[derive(Debug, clap::Args)]
pub struct AclArgs {
    /// The broker's format.
    #[arg(long, value_enum)]
    format: Format,
    /// The directory to write into (created if missing; files in it are replaced).
    #[arg(long)]
    out: PathBuf,
    /// The file holding the control plane's broker password (the one given to `drover
    /// serve --broker-password-file`).
    #[arg(long, required_unless_present = "no_control")]
    control_password_file: Option<PathBuf>,
    /// Leave the control plane out: its login is managed elsewhere.
    #[arg(long, conflicts_with = "control_password_file")]
    no_control: bool,
}

pub fn run(ctx: &Ctx, cmd: BrokerCommand) -> anyhow::Result<i32> {
    match cmd {
        BrokerCommand::Acl(a) => acl(ctx, a),
    }
}

/// Replaces `path` with `bytes` of mode `mode`, durably: a broker reloading meanwhile
/// reads the old file or the new one, never half of one.
fn write_replacing(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write as _;
    drover_protocol::durable::replace_with(path, mode, |f| f.write_all(bytes))
        .with_context(|| format!("writing {}", path.display()))
}

fn acl(ctx: &Ctx, a: AclArgs) -> anyhow::Result<i32> {
    let Format::Mosquitto = a.format;
    let control_hash = match &a.control_password_file {
        Some(file) => {
            let password = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?
                .trim()
                .to_string();
            if password.is_empty() {
                bail!("{} is empty", file.display());
            }
            Some(mosquitto::password_hash(&password)?)
        }
        None => None,
    };

    let db = ctx.data.database();
    if !db.exists() {
        bail!(
            "no database at {} (is --data-dir the server's?)",
            db.display()
        );
    }
    // Read as it stands: the server, not this command, migrates the database.
    let db = Db::open(&db)?;
    let logins = tokio::runtime::Builder::new_current_thread()
        .build()?
        .block_on(crate::fleet::store::agent_broker_logins(&db))?;

    let mut passwd = String::new();
    if let Some(h) = &control_hash {
        passwd.push_str(&mosquitto::passwd_line(CONTROL_USER, h));
    }
    let (mut agents, mut skipped) = (Vec::new(), Vec::new());
    for (id, hash) in logins {
        match hash {
            Some(h) if drover_protocol::topics::is_valid_agent_id(&id) => {
                passwd.push_str(&mosquitto::passwd_line(&id, &h));
                agents.push(id);
            }
            _ => skipped.push(id),
        }
    }

    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let dir = a
        .out
        .canonicalize()
        .with_context(|| format!("resolving {}", a.out.display()))?;
    let (passwd_path, acl_path, conf_path) = (
        dir.join(mosquitto::PASSWD_FILE),
        dir.join(mosquitto::ACL_FILE),
        dir.join(mosquitto::CONF_SNIPPET_FILE),
    );
    // Password hashes: owner only (give the file to the broker's user).
    write_replacing(&passwd_path, passwd.as_bytes(), 0o600)?;
    write_replacing(
        &acl_path,
        mosquitto::acl_file(control_hash.is_some()).as_bytes(),
        0o644,
    )?;
    write_replacing(
        &conf_path,
        mosquitto::conf_snippet(&passwd_path, &acl_path).as_bytes(),
        0o644,
    )?;

    match ctx.output {
        Output::Json => print_json(&serde_json::json!({
            "format": "mosquitto",
            "passwd": passwd_path,
            "acl": acl_path,
            "conf_snippet": conf_path,
            "control": control_hash.is_some(),
            "agents": agents,
            "skipped": skipped,
        }))?,
        Output::Text => {
            let control = if control_hash.is_some() {
                format!("{CONTROL_USER} and ")
            } else {
                String::new()
            };
            println!(
                "wrote {} ({control}{} agents)",
                passwd_path.display(),
                agents.len()
            );
            println!("wrote {}", acl_path.display());
            println!("wrote {}", conf_path.display());
            println!(
                "add the snippet's settings to mosquitto.conf, make the files readable by \
                 Mosquitto's user, and reload it (SIGHUP)"
            );
        }
    }
    if !skipped.is_empty() {
        eprintln!(
            "warning: no Mosquitto hash stored for {}: give them new credentials \
             (drover agents add ID) and run this again",
            skipped.join(", ")
        );
    }
    Ok(0)
}
