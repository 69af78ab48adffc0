//! `drover keygen`.

use drover_protocol::keys::{SigningKey, load_public, public_path};

use super::{Ctx, Output, print_json};

/// Flags of `drover keygen`.
#[derive(Debug, clap::Args)]
pub struct KeygenArgs {}

pub fn run(ctx: &Ctx, _a: KeygenArgs) -> anyhow::Result<i32> {
    ctx.data.create()?;
    let mut out = serde_json::Map::new();
    for (name, path) in [
        ("publisher", ctx.data.publisher_key()),
        ("control_plane", ctx.data.control_plane_key()),
    ] {
        let created = if path.exists() {
            false
        } else {
            SigningKey::generate().save(&path)?;
            true
        };
        let public = load_public(&public_path(&path))?;
        if ctx.output == Output::Text {
            println!(
                "{name:<14} {} {} ({})",
                public,
                if created { "created" } else { "exists " },
                path.display()
            );
        }
        out.insert(
            name.to_string(),
            serde_json::json!({ "public_key": public, "path": path, "created": created }),
        );
    }
    if ctx.output == Output::Json {
        print_json(&out)?;
    }
    Ok(0)
}
