//! OpenAPI schemas for the protocol types whose JSON is hand-written (feature
//! `openapi`); the rest derive theirs.

use std::borrow::Cow;

use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Schema, Type};
use utoipa::{PartialSchema, ToSchema};

use crate::keys::PublicKey;
use crate::signed::Signature;

impl PartialSchema for PublicKey {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^[0-9a-f]{64}$"))
            .description(Some(
                "An Ed25519 public key: 32 bytes as 64 hex characters.",
            ))
            .into()
    }
}

impl ToSchema for PublicKey {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("PublicKey")
    }
}

/// The schema of every `Signed<T>`: name a field's type as this
/// (`#[schema(value_type = drover_protocol::openapi::SignedDoc)]`), since the schema
/// derive cannot see through the generic.
#[derive(Debug)]
pub struct SignedDoc;

impl PartialSchema for SignedDoc {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .description(Some(
                "A signed document: `payload` is the document's exact JSON text, and each signature covers `drover:` + the kind's context + NUL + `payload`.",
            ))
            .property("payload", ObjectBuilder::new().schema_type(Type::String))
            .required("payload")
            .property(
                "signatures",
                ArrayBuilder::new().items(Signature::schema()),
            )
            .required("signatures")
            .into()
    }
}

impl ToSchema for SignedDoc {
    fn name() -> Cow<'static, str> {
        // One schema whatever the kind: the payload is JSON text either way.
        Cow::Borrowed("Signed")
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((Signature::name().into(), Signature::schema()));
        <Signature as ToSchema>::schemas(schemas);
    }
}
