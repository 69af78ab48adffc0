//! `drover activation create|list|revoke`.

use std::time::Duration;

use crate::cli::args::{parse_duration, parse_tag};
use crate::cli::context::{Ctx, Output};
use crate::cli::print::{ago, print_json, print_table};
use crate::fleet::types::{Activation, ActivationCreated, ActivationRequest};

/// Activation commands.
#[derive(Debug, clap::Subcommand)]
pub enum ActivationCommand {
    /// Mint an activation code agents enroll with.
    Create {
        /// How long it can be used.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        expires: Duration,
        /// How many agents may enroll with it.
        #[arg(long, default_value_t = 1)]
        max_uses: u32,
        /// Tags enrolled agents get; repeatable, or comma-separated KEY=VALUE pairs.
        #[arg(long = "tags", alias = "tag", value_delimiter = ',', value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// Bind it to one agent id.
        #[arg(long)]
        agent_id: Option<String>,
    },
    /// List activations.
    List,
    /// Revoke an activation: no more enrollments with it.
    Revoke {
        /// The activation id.
        id: String,
    },
}

/// `drover activation`.
pub fn run(ctx: &Ctx, cmd: ActivationCommand) -> anyhow::Result<i32> {
    let client = ctx.client()?;
    match cmd {
        ActivationCommand::Create {
            expires,
            max_uses,
            tags,
            agent_id,
        } => {
            let created: ActivationCreated = client.post(
                "create activation",
                "/api/v1/activations",
                &ActivationRequest {
                    expires_secs: expires.as_secs().max(1),
                    max_uses,
                    tags: tags.into_iter().collect(),
                    agent_id,
                },
            )?;
            match ctx.output {
                Output::Json => print_json(&created)?,
                Output::Text => {
                    println!("activation id:   {}", created.activation.id);
                    println!("activation code: {}", created.code);
                    println!(
                        "enroll with: drover-agent enroll --server URL --activation-id {} --code {} --id AGENT_ID",
                        created.activation.id, created.code
                    );
                }
            }
        }
        ActivationCommand::List => {
            let list: Vec<Activation> = client.get("list activations", "/api/v1/activations")?;
            if ctx.output == Output::Json {
                print_json(&list)?;
                return Ok(0);
            }
            let now = drover_protocol::now_ms();
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|a| {
                    let state = if a.revoked_ms.is_some() {
                        "revoked"
                    } else if now > a.expires_ms {
                        "expired"
                    } else if a.uses >= a.max_uses {
                        "used up"
                    } else {
                        "active"
                    };
                    vec![
                        a.id.clone(),
                        state.to_string(),
                        format!("{}/{}", a.uses, a.max_uses),
                        a.agent_id.clone().unwrap_or_default(),
                        a.tags
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(","),
                        ago(a.created_ms),
                    ]
                })
                .collect();
            print_table(&["ID", "STATE", "USES", "AGENT", "TAGS", "CREATED"], &rows);
        }
        ActivationCommand::Revoke { id } => {
            let v: serde_json::Value = client.post(
                "revoke activation",
                &format!("/api/v1/activations/{id}/revoke"),
                &serde_json::json!({}),
            )?;
            match ctx.output {
                Output::Json => print_json(&v)?,
                Output::Text => println!("activation {id} revoked"),
            }
        }
    }
    Ok(0)
}
