//! `skald keys`, `skald rules` and `skald certs`: the admin API and development certificates.

use std::path::PathBuf;

use anyhow::Context;
use hyper::Method;
use serde_json::{Value, json};

use crate::client::{HttpClient, encode};
use crate::subscription::call;

#[derive(clap::Subcommand)]
pub enum KeysCommand {
    /// Create a key; it is printed once and never shown again.
    Create {
        /// A name for the key (who or what uses it).
        #[arg(long)]
        name: String,
        /// A role; repeat for several.
        #[arg(long = "role")]
        roles: Vec<String>,
        /// Expire after this long, such as 90d or 12h.
        #[arg(long)]
        expires_in: Option<String>,
        /// Print the server's JSON.
        #[arg(long)]
        json: bool,
    },
    /// List keys (never their secrets).
    List {
        /// Print the server's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key at once.
    Revoke {
        /// The key's id (the 16 hex digits after skald_).
        id: String,
    },
}

#[derive(clap::Subcommand)]
pub enum RulesCommand {
    /// Print the rules in force and their revision, as JSON.
    Get,
    /// Replace every rule with those in a JSON file (`{"rules": [...]}`; `-` reads stdin).
    Set {
        file: String,
        /// Fail if the rules changed since this revision.
        #[arg(long)]
        expected_revision: Option<u64>,
    },
}

#[derive(clap::Subcommand)]
pub enum CertsCommand {
    /// Write a development CA, a server certificate for localhost, a client certificate
    /// (CN=dev-client, O=admin) and a node certificate (CN=skald-node). For development only.
    Dev {
        /// The directory to write to.
        #[arg(long, default_value = "skald-certs")]
        out: PathBuf,
    },
}

pub async fn keys(client: &HttpClient, command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create {
            name,
            roles,
            expires_in,
            json,
        } => {
            let mut body = json!({ "name": name, "roles": roles });
            if let Some(e) = expires_in {
                body["expiresIn"] = json!(e);
            }
            let answer = call(client, Method::POST, "/v1/admin/keys", Some(body)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                eprintln!(
                    "created key {} ({}); store it now, it is not shown again:",
                    answer["id"].as_str().unwrap_or(""),
                    answer["name"].as_str().unwrap_or("")
                );
                println!("{}", answer["key"].as_str().unwrap_or(""));
            }
            Ok(())
        }
        KeysCommand::List { json } => {
            let answer = call(client, Method::GET, "/v1/admin/keys", None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
                return Ok(());
            }
            println!(
                "{:<16}  {:<24} {:<24} {:<8} expires",
                "id", "name", "roles", "state"
            );
            for k in answer["keys"].as_array().into_iter().flatten() {
                let roles: Vec<&str> = k["roles"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                println!(
                    "{:<16}  {:<24} {:<24} {:<8} {}",
                    k["id"].as_str().unwrap_or(""),
                    k["name"].as_str().unwrap_or(""),
                    roles.join(","),
                    if k["revoked"].as_bool() == Some(true) {
                        "revoked"
                    } else {
                        "active"
                    },
                    k["expiresAt"]
                        .as_i64()
                        .map_or("never".to_owned(), |t| t.to_string())
                );
            }
            Ok(())
        }
        KeysCommand::Revoke { id } => {
            call(
                client,
                Method::DELETE,
                &format!("/v1/admin/keys/{}", encode(&id)),
                None,
            )
            .await?;
            println!("revoked {id}");
            Ok(())
        }
    }
}

pub async fn rules(client: &HttpClient, command: RulesCommand) -> anyhow::Result<()> {
    match command {
        RulesCommand::Get => {
            let answer = call(client, Method::GET, "/v1/admin/rules", None).await?;
            println!("{}", serde_json::to_string_pretty(&answer)?);
            Ok(())
        }
        RulesCommand::Set {
            file,
            expected_revision,
        } => {
            let text = if file == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading standard input")?
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("cannot read {file}"))?
            };
            let mut body: Value = serde_json::from_str(&text)
                .with_context(|| format!("{file} is not JSON of the form {{\"rules\": [...]}}"))?;
            if let Some(r) = expected_revision {
                body["expectedRevision"] = json!(r);
            }
            let answer = call(client, Method::PUT, "/v1/admin/rules", Some(body)).await?;
            println!(
                "rules set: revision {}, {} rules",
                answer["revision"],
                answer["rules"].as_array().map_or(0, Vec::len)
            );
            Ok(())
        }
    }
}

pub fn certs(command: CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::Dev { out } => {
            let files = skald_security::tls::write_dev_certificates(&out)
                .map_err(|e| anyhow::anyhow!(e))?;
            for f in files {
                println!("{}", f.display());
            }
            eprintln!(
                "development certificates only: the CA key is not kept, so nothing else can be \
                 signed with it"
            );
            Ok(())
        }
    }
}
