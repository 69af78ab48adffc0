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
        ("root", ctx.data.root_key()),
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
    let created = crate::trust::ensure_initial(&ctx.data)?;
    let (_, ks) = crate::trust::load(&ctx.data)?;
    if ctx.output == Output::Text {
        println!(
            "{:<14} version {} {} ({})",
            "key set",
            ks.version,
            if created { "created" } else { "exists " },
            ctx.data.keyset().display()
        );
    }
    out.insert(
        "keyset".to_string(),
        serde_json::json!({ "version": ks.version, "path": ctx.data.keyset(), "created": created }),
    );
    if ctx.output == Output::Json {
        print_json(&out)?;
    }
    Ok(0)
}
