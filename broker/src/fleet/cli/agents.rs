//! `drover agents list|add|tag|events|deregister`.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::cli::args::parse_tag;
use crate::cli::context::{Ctx, Output};
use crate::cli::print::{ago, print_json, print_table};
use crate::fleet::types::{
    ActivationCreated, ActivationRequest, Agent, AgentEvent, Credentials, Deregistered, TagChange,
};

/// Agent commands.
#[derive(Debug, clap::Subcommand)]
pub enum AgentsCommand {
    /// List agents with their status, tags, labels and when each was last seen.
    List,
    /// Add an agent: mint its broker credential and write a config file for drover-agent.
    Add(AddArgs),
    /// Set or remove an agent's tags, which jobs target by (`--targets tag:KEY=VALUE`).
    Tag(TagArgs),
    /// Show what agents reported outside of job results: refusals, bad messages.
    Events(EventsArgs),
    /// Deregister an agent: its broker credential stops working at once, and the embedded
    /// broker drops its connection.
    Deregister(DeregisterArgs),
}

/// Flags of `drover agents deregister`.
#[derive(Debug, clap::Args)]
pub struct DeregisterArgs {
    /// The agent's id.
    id: String,
}

/// Flags of `drover agents tag`.
#[derive(Debug, clap::Args)]
pub struct TagArgs {
    /// The agent's id.
    id: String,
    /// Tags to set, KEY=VALUE.
    #[arg(value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// A tag to remove, by key; repeatable.
    #[arg(long = "remove", value_name = "KEY")]
    remove: Vec<String>,
}

/// Flags of `drover agents add`.
#[derive(Debug, clap::Args)]
pub struct AddArgs {
    /// The agent's id.
    id: String,
    /// Where to write the agent's config file.
    #[arg(long, short)]
    out: PathBuf,
    /// The broker the agent should dial; defaults to the server's.
    #[arg(long)]
    broker: Option<String>,
    /// The agent's data directory, written into the config.
    #[arg(long)]
    agent_data_dir: Option<PathBuf>,
    /// A tag KEY=VALUE, which jobs target by; repeatable. It goes into the agent's
    /// activation, so the server sets it when the agent enrolls.
    #[arg(long = "tag", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// Directories plugins may be granted read-only (policy); repeatable.
    #[arg(long = "allow-read", default_values = ["/var/lib/dpkg"])]
    allow_read: Vec<String>,
    /// Do not allow the host-facts capability.
    #[arg(long)]
    deny_host_facts: bool,
    /// A program plugins may be granted to run (exact absolute path, policy); repeatable.
    /// `*` allows any program: what the command runner (`drover run-command`) needs.
    #[arg(long = "allow-exec", value_name = "PATH")]
    allow_exec: Vec<String>,
    /// A user commands may run as (the agent must run as root); repeatable.
    #[arg(long = "allow-run-as", value_name = "USER")]
    allow_run_as: Vec<String>,
    /// A HOST:PORT plugins may be granted TCP connections to (policy); repeatable.
    #[arg(long = "allow-network", value_name = "HOST:PORT")]
    allow_network: Vec<String>,
}

/// Flags of `drover agents events`.
#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// Only this agent's.
    #[arg(long)]
    agent: Option<String>,
    /// At most this many, newest last.
    #[arg(long, default_value_t = 100)]
    limit: u32,
}

/// `drover agents`.
pub fn run(ctx: &Ctx, cmd: AgentsCommand) -> anyhow::Result<i32> {
    match cmd {
        AgentsCommand::List => list(ctx),
        AgentsCommand::Add(a) => add(ctx, a),
        AgentsCommand::Tag(a) => tag(ctx, a),
        AgentsCommand::Events(a) => events(ctx, a),
        AgentsCommand::Deregister(a) => deregister(ctx, a),
    }
}

fn deregister(ctx: &Ctx, a: DeregisterArgs) -> anyhow::Result<i32> {
    let d: Deregistered = ctx.client()?.post(
        "deregister agent",
        &format!("/api/v1/agents/{}/deregister", a.id),
        &serde_json::json!({}),
    )?;
    match ctx.output {
        Output::Json => print_json(&d)?,
        Output::Text if d.embedded_broker => println!(
            "agent {} deregistered: its credential is deleted{}",
            d.id,
            if d.disconnected {
                " and its connection closed"
            } else {
                " (it was not connected)"
            }
        ),
        Output::Text => println!(
            "agent {} deregistered: its credential is deleted; write the external broker's \
             files again (drover broker acl) and reload it",
            d.id
        ),
    }
    Ok(0)
}

fn pairs(tags: &std::collections::BTreeMap<String, String>) -> String {
    tags.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn tag(ctx: &Ctx, a: TagArgs) -> anyhow::Result<i32> {
    if a.tags.is_empty() && a.remove.is_empty() {
        anyhow::bail!("give tags to set (KEY=VALUE) or to remove (--remove KEY)");
    }
    let change = TagChange {
        set: a.tags.into_iter().collect(),
        remove: a.remove,
    };
    let agent: Agent = ctx.client()?.post(
        "tag agent",
        &format!("/api/v1/agents/{}/tags", a.id),
        &change,
    )?;
    match ctx.output {
        Output::Json => print_json(&agent)?,
        Output::Text => println!("agent {} tags: {}", agent.id, pairs(&agent.tags)),
    }
    Ok(0)
}

fn list(ctx: &Ctx) -> anyhow::Result<i32> {
    let agents: Vec<Agent> = ctx.client()?.get("list agents", "/api/v1/agents")?;
    if ctx.output == Output::Json {
        print_json(&agents)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            vec![
                a.id.clone(),
                match (a.deregistered_ms, a.online) {
                    (Some(_), _) => "deregistered",
                    (None, true) => "online",
                    (None, false) => "offline",
                }
                .to_string(),
                a.hostname.clone(),
                a.os_version.clone(),
                a.arch.clone(),
                a.agent_version.clone(),
                pairs(&a.tags),
                pairs(&a.labels),
                ago(a.last_seen_ms),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "STATUS",
            "HOSTNAME",
            "OS",
            "ARCH",
            "VERSION",
            "TAGS",
            "LABELS",
            "LAST SEEN",
        ],
        &rows,
    );
    Ok(0)
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialise")
}

fn add(ctx: &Ctx, a: AddArgs) -> anyhow::Result<i32> {
    // Checked before anything is minted: the agent would refuse to start with them.
    for p in &a.allow_exec {
        if p != "*" && !drover_protocol::manifest::is_clean_absolute(p) {
            anyhow::bail!(
                "--allow-exec {p:?}: give a program's absolute path, without '.', '..' or '//', or *"
            );
        }
    }
    for u in &a.allow_run_as {
        if u.is_empty() || u.contains(['/', ':', '\0']) {
            anyhow::bail!("--allow-run-as {u:?}: give a user name");
        }
    }
    for n in &a.allow_network {
        n.parse::<drover_protocol::manifest::NetAddr>()
            .map_err(|e| anyhow::anyhow!("--allow-network: {e}"))?;
    }
    let client = ctx.client()?;
    let creds: Credentials = client.post(
        "create credentials",
        &format!("/api/v1/agents/{}/credentials", a.id),
        &serde_json::json!({}),
    )?;
    let broker = match a.broker {
        Some(b) => b,
        None => ctx.data.read_server_info()?.broker,
    };
    let (signed_keyset, keyset) = crate::trust::files::load(&ctx.data)?;
    let keyset_out = crate::trust::files::beside(&a.out, "keyset.json");
    drover_protocol::durable::replace(&keyset_out, &serde_json::to_vec_pretty(&signed_keyset)?)
        .with_context(|| format!("writing {}", keyset_out.display()))?;
    let mut text = String::new();
    text.push_str("# drover-agent configuration, written by `drover agents add`.\n");
    text.push_str(&format!("id = {}\n", toml_str(&a.id)));
    text.push_str(&format!("broker = {}\n", toml_str(&broker)));
    text.push_str(&format!("password = {}\n", toml_str(&creds.password)));
    if let Some(d) = &a.agent_data_dir {
        text.push_str(&format!(
            "data_dir = {}\n",
            toml_str(&d.display().to_string())
        ));
    }
    // The agent makes its own keys and registers them with this one-time activation the
    // first time it starts; the keys never leave the device.
    let activation: ActivationCreated = client.post(
        "create activation",
        "/api/v1/activations",
        &ActivationRequest {
            expires_secs: 24 * 3600,
            max_uses: 1,
            tags: a.tags.iter().cloned().collect(),
            agent_id: Some(a.id.clone()),
        },
    )?;
    let api = match &ctx.server {
        Some(s) => s.clone(),
        None => ctx.data.read_server_info()?.api,
    };
    text.push_str("\n[enroll]\n");
    text.push_str(&format!("server = {}\n", toml_str(&api)));
    text.push_str(&format!(
        "activation_id = {}\n",
        toml_str(&activation.activation.id)
    ));
    text.push_str(&format!("code = {}\n", toml_str(&activation.code)));
    // Labels the agent reports of itself: shown beside its tags, never targeted by.
    text.push_str("\n[tags]\n");
    for (k, v) in &a.tags {
        text.push_str(&format!("{} = {}\n", toml_str(k), toml_str(v)));
    }
    text.push_str("\n[trust]\n");
    let roots: Vec<String> = keyset.roots.iter().map(|k| toml_str(&k.to_hex())).collect();
    text.push_str(&format!("roots = [{}]\n", roots.join(", ")));
    text.push_str(&format!("root_threshold = {}\n", keyset.root_threshold));
    text.push_str(&format!(
        "keyset_file = {}\n",
        toml_str(&keyset_out.display().to_string())
    ));
    text.push_str("\n[policy]\n");
    text.push_str(&format!("host_facts = {}\n", !a.deny_host_facts));
    let paths: Vec<String> = a.allow_read.iter().map(|p| toml_str(p)).collect();
    text.push_str(&format!("read_paths = [{}]\n", paths.join(", ")));
    let programs: Vec<String> = a.allow_exec.iter().map(|p| toml_str(p)).collect();
    text.push_str(&format!("exec = [{}]\n", programs.join(", ")));
    let users: Vec<String> = a.allow_run_as.iter().map(|u| toml_str(u)).collect();
    text.push_str(&format!("run_as = [{}]\n", users.join(", ")));
    let addrs: Vec<String> = a.allow_network.iter().map(|n| toml_str(n)).collect();
    text.push_str(&format!("network = [{}]\n", addrs.join(", ")));
    drover_protocol::keys::write_private(&a.out, text.as_bytes())
        .with_context(|| format!("writing {} (it must not exist yet)", a.out.display()))?;
    match ctx.output {
        Output::Json => print_json(&serde_json::json!({ "id": a.id, "config": a.out }))?,
        Output::Text => println!(
            "agent {} added; start it with: drover-agent --config {}",
            a.id,
            a.out.display()
        ),
    }
    Ok(0)
}

fn events(ctx: &Ctx, a: EventsArgs) -> anyhow::Result<i32> {
    let mut path = format!("/api/v1/events?limit={}", a.limit);
    if let Some(agent) = &a.agent {
        path.push_str(&format!("&agent={agent}"));
    }
    let events: Vec<AgentEvent> = ctx.client()?.get("list events", &path)?;
    if ctx.output == Output::Json {
        print_json(&events)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                ago(e.at_ms),
                e.agent_id.clone(),
                e.kind.clone(),
                e.message.clone(),
            ]
        })
        .collect();
    print_table(&["WHEN", "AGENT", "KIND", "MESSAGE"], &rows);
    Ok(0)
}
