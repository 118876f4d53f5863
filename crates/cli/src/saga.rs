//! `skald saga register | list | show | instances | history | retry | cancel | disable | enable |
//! delete`: sagas on a running server, through `/v1/sagas` and `/v1/saga-instances`.

use anyhow::Context;
use bytes::Bytes;
use hyper::Method;
use serde_json::{Value, json};

use crate::client::{HttpClient, encode, expect_success};
use crate::subscription::call;

#[derive(clap::Subcommand)]
pub enum SagaCommand {
    /// Register a definition from a YAML or JSON file (`-` reads standard input).
    Register {
        /// The definition file.
        file: String,
    },
    /// List the definitions with their versions and instances by state.
    List {
        /// Print the server's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show a definition as JSON.
    Show {
        /// The definition's name.
        name: String,
        /// A version; the newest by default.
        #[arg(long)]
        version: Option<u32>,
    },
    /// List instances, newest first.
    Instances {
        /// Only this state: running, compensating, completed, compensated, stuck, cancelled.
        #[arg(long)]
        state: Option<String>,
        /// Only this definition.
        #[arg(long)]
        definition: Option<String>,
        /// At most this many [default: 100, at most 1000].
        #[arg(long)]
        limit: Option<usize>,
        /// Print the server's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one instance's history: steps, attempts, errors, timings.
    History {
        /// The saga id.
        id: String,
        /// Print the server's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Resume a stuck instance with fresh attempts.
    Retry {
        /// The saga id.
        id: String,
    },
    /// Stop a definition's triggers from starting instances (those started run to their end).
    Disable {
        /// The definition's name.
        name: String,
    },
    /// Let a disabled definition's triggers start instances again, from now on.
    Enable {
        /// The definition's name.
        name: String,
    },
    /// Delete a definition (refused while an instance of it is running, compensating or
    /// stuck); its instances' histories stay.
    Delete {
        /// The definition's name.
        name: String,
    },
    /// Cancel a running instance: its completed steps are compensated.
    Cancel {
        /// The saga id.
        id: String,
        /// Why, recorded in its history.
        #[arg(long)]
        reason: Option<String>,
    },
}

pub async fn run(client: &HttpClient, command: SagaCommand) -> anyhow::Result<()> {
    match command {
        SagaCommand::Register { file } => register(client, &file).await,
        SagaCommand::List { json } => {
            let answer = call(client, Method::GET, "/v1/sagas", None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
                return Ok(());
            }
            println!(
                "{:<32} {:>7}  {:<8}  instances",
                "name", "version", "status"
            );
            for saga in answer["sagas"].as_array().into_iter().flatten() {
                let counts: Vec<String> = saga["instances"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(state, n)| format!("{state} {n}"))
                    .collect();
                println!(
                    "{:<32} {:>7}  {:<8}  {}",
                    saga["name"].as_str().unwrap_or(""),
                    saga["latestVersion"],
                    if saga["enabled"] == false {
                        "disabled"
                    } else {
                        "enabled"
                    },
                    if counts.is_empty() {
                        "none".to_owned()
                    } else {
                        counts.join(", ")
                    }
                );
            }
            Ok(())
        }
        SagaCommand::Show { name, version } => {
            let mut path = format!("/v1/sagas/{}", encode(&name));
            if let Some(v) = version {
                path.push_str(&format!("?version={v}"));
            }
            let answer = call(client, Method::GET, &path, None).await?;
            println!("{}", serde_json::to_string_pretty(&answer)?);
            Ok(())
        }
        SagaCommand::Instances {
            state,
            definition,
            limit,
            json,
        } => {
            let mut query = Vec::new();
            if let Some(s) = state {
                query.push(format!("state={}", encode(&s)));
            }
            if let Some(d) = definition {
                query.push(format!("definition={}", encode(&d)));
            }
            if let Some(l) = limit {
                query.push(format!("limit={l}"));
            }
            let path = format!("/v1/saga-instances?{}", query.join("&"));
            let answer = call(client, Method::GET, &path, None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
                return Ok(());
            }
            println!(
                "{:<36}  {:<20} {:<12} {:<20} last error",
                "saga id", "definition", "state", "key"
            );
            for i in answer["instances"].as_array().into_iter().flatten() {
                println!(
                    "{:<36}  {:<20} {:<12} {:<20} {}",
                    i["sagaId"].as_str().unwrap_or(""),
                    format!(
                        "{} v{}",
                        i["definition"].as_str().unwrap_or(""),
                        i["version"]
                    ),
                    i["state"].as_str().unwrap_or(""),
                    i["correlationKey"].as_str().unwrap_or(""),
                    i["lastError"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        SagaCommand::History { id, json } => {
            let path = format!("/v1/saga-instances/{}", encode(&id));
            let answer = call(client, Method::GET, &path, None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                print_history(&answer);
            }
            Ok(())
        }
        SagaCommand::Retry { id } => {
            let path = format!("/v1/saga-instances/{}/retry", encode(&id));
            let answer = call(client, Method::POST, &path, None).await?;
            println!("{id} is {} again", answer["state"].as_str().unwrap_or("?"));
            Ok(())
        }
        SagaCommand::Disable { name } => {
            change(client, Method::POST, &name, "/disable", "disabled").await
        }
        SagaCommand::Enable { name } => {
            change(client, Method::POST, &name, "/enable", "enabled").await
        }
        SagaCommand::Delete { name } => change(client, Method::DELETE, &name, "", "deleted").await,
        SagaCommand::Cancel { id, reason } => {
            let path = format!("/v1/saga-instances/{}/cancel", encode(&id));
            let body = reason.map(|r| json!({ "reason": r }));
            call(client, Method::POST, &path, body).await?;
            println!("{id} is cancelling: its completed steps are being compensated");
            Ok(())
        }
    }
}

async fn change(
    client: &HttpClient,
    method: Method,
    name: &str,
    suffix: &str,
    done: &str,
) -> anyhow::Result<()> {
    let path = format!("/v1/sagas/{}{suffix}", encode(name));
    let answer = call(client, method, &path, None).await?;
    if answer["changed"] == true {
        println!("{name} is {done}");
    } else {
        println!("{name} was {done} already; nothing changed");
    }
    Ok(())
}

async fn register(client: &HttpClient, file: &str) -> anyhow::Result<()> {
    let text = if file == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the definition from stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))?
    };
    let content_type = if file.ends_with(".json") {
        "application/json"
    } else {
        "application/yaml"
    };
    let (status, body) = client
        .call(
            Method::POST,
            "/v1/sagas",
            &[("content-type", content_type)],
            Bytes::from(text),
        )
        .await?;
    expect_success(status, &body).with_context(|| format!("{file} was not registered"))?;
    let answer: Value = serde_json::from_slice(&body).context("the server's answer is not JSON")?;
    let name = answer["name"].as_str().unwrap_or("?");
    let version = &answer["version"];
    if answer["replayed"] == true {
        println!("{name} version {version} was already registered as it is; nothing changed");
    } else {
        println!("registered {name} version {version}");
    }
    Ok(())
}

fn print_history(answer: &Value) {
    println!(
        "{} {} v{} key {}: {}",
        answer["sagaId"].as_str().unwrap_or(""),
        answer["definition"].as_str().unwrap_or(""),
        answer["version"],
        answer["correlationKey"].as_str().unwrap_or(""),
        answer["state"].as_str().unwrap_or("")
    );
    let start = answer["history"][0]["time"].as_i64().unwrap_or(0);
    for event in answer["history"].as_array().into_iter().flatten() {
        let at_ms = (event["time"].as_i64().unwrap_or(0) - start) as f64 / 1000.0;
        let data = &event["data"];
        let step = match (data["step"].as_str(), data["phase"].as_str()) {
            (Some(step), Some(phase)) => format!("{step} ({phase})"),
            (Some(step), None) => step.to_owned(),
            _ => String::new(),
        };
        let detail = match event["type"].as_str().unwrap_or("") {
            "StepSucceeded" => format!("attempt {} in {} ms", data["attempt"], data["durationMs"]),
            "StepFailed" => format!(
                "attempt {} in {} ms{}: {}",
                data["attempt"],
                data["durationMs"],
                if data["final"] == true {
                    ", final"
                } else {
                    ", will retry"
                },
                data["error"].as_str().unwrap_or("")
            ),
            "SagaCompensating" | "SagaCancelRequested" => {
                data["reason"].as_str().unwrap_or("").to_owned()
            }
            "SagaStuck" => data["error"].as_str().unwrap_or("").to_owned(),
            _ => String::new(),
        };
        println!(
            "{:>10.1} ms  {:<20} {:<30} {}",
            at_ms,
            event["type"].as_str().unwrap_or(""),
            step,
            detail
        );
    }
}
