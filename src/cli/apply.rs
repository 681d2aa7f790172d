//! `gantry apply -f FILE|-` and `gantry delete`: workloads from files (YAML or JSON, several
//! documents each), all validated before the first one is sent.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use gantry::pb;
use gantry::workload::{self, Format, Workload};

use super::error::{self, UsageError};
use super::{Ctx, print};

/// `gantry apply`.
#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// Workload file (YAML or JSON, several documents allowed); `-` reads stdin. Repeatable.
    #[arg(short = 'f', long = "filename", value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
    /// Print what would change (a diff of each spec), change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `gantry delete`.
#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// `workload` (or `workloads`, `wl`) and the names to delete; `workload/NAME` also works.
    #[arg(value_name = "KIND NAME")]
    pub args: Vec<String>,
    /// Delete the workloads named in these files (as `apply -f` takes them). Repeatable.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

/// A workload read from a file, with where it came from.
#[derive(Debug)]
pub struct Sourced {
    /// The file (`-` for stdin).
    pub source: String,
    /// The workload.
    pub workload: Workload,
}

/// The text format of `text` read from `path`: by extension, else by its first character.
fn format_of(path: &Path, text: &str) -> Format {
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => Format::Json,
        Some("yaml" | "yml") => Format::Yaml,
        _ if text.trim_start().starts_with(['{', '[']) => Format::Json,
        _ => Format::Yaml,
    }
}

/// The problems of one input, one line each.
fn problems(source: &str, err: &workload::Error) -> Vec<String> {
    match err {
        workload::Error::Invalid(documents) => documents
            .iter()
            .flat_map(|d| {
                let doc = d
                    .document
                    .map(|n| format!("document {n}: "))
                    .unwrap_or_default();
                d.errors
                    .0
                    .iter()
                    .map(move |e| format!("{source}: {doc}{e}"))
                    .collect::<Vec<_>>()
            })
            .collect(),
        other => vec![format!("{source}: {other}")],
    }
}

/// Reads and validates every workload of every file; any problem in any of them fails the
/// whole read, with every problem listed.
pub fn read_workloads(files: &[PathBuf]) -> anyhow::Result<Vec<Sourced>> {
    let mut found = Vec::new();
    let mut errors = Vec::new();
    for path in files {
        let (source, text) = if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading workloads from stdin")?;
            ("-".to_string(), text)
        } else {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            (path.display().to_string(), text)
        };
        match workload::parse_and_validate(&text, format_of(path, &text)) {
            Ok(workloads) => found.extend(workloads.into_iter().map(|workload| Sourced {
                source: source.clone(),
                workload,
            })),
            Err(err) => errors.extend(problems(&source, &err)),
        }
    }
    for (i, w) in found.iter().enumerate() {
        if let Some(first) = found[..i]
            .iter()
            .find(|o| o.workload.name == w.workload.name)
        {
            errors.push(format!(
                "{}: name: '{}' is also defined in {}",
                w.source, w.workload.name, first.source
            ));
        }
    }
    if !errors.is_empty() {
        bail!(
            "invalid workloads; nothing was sent to the scheduler:\n  {}",
            errors.join("\n  ")
        );
    }
    Ok(found)
}

/// `gantry apply`.
pub async fn apply(ctx: &mut Ctx, args: ApplyArgs) -> anyhow::Result<()> {
    let workloads = read_workloads(&args.files)?;
    let client = ctx.client().await?;
    let mut api = client.workloads();
    let mut failed = 0;
    for Sourced { workload, .. } in &workloads {
        let name = &workload.name;
        let request = pb::ApplyWorkloadRequest {
            spec: Some(pb::WorkloadSpec::from(workload)),
            dry_run: args.dry_run,
            expected_revision: None,
        };
        match api.apply(client.request(request)).await {
            Ok(response) => {
                let response = response.into_inner();
                let what = if response.created {
                    "created"
                } else if response.changed {
                    "configured"
                } else {
                    "unchanged"
                };
                let dry = if args.dry_run { " (dry run)" } else { "" };
                print(&format!("workload/{name} {what}{dry}\n"))?;
                if args.dry_run && !response.diff.is_empty() {
                    let mut diff = response.diff;
                    if !diff.ends_with('\n') {
                        diff.push('\n');
                    }
                    print(&diff)?;
                }
            }
            Err(status) => {
                failed += 1;
                eprintln!(
                    "error: workload/{name}: {}",
                    error::api(status, client.address())
                );
            }
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} workloads could not be applied",
            workloads.len()
        );
    }
    Ok(())
}

/// Whether `word` names workloads.
pub fn is_workload_word(word: &str) -> bool {
    matches!(word, "workload" | "workloads" | "wl")
}

/// The workload names a delete command line names.
fn names_to_delete(args: &DeleteArgs) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    if !args.files.is_empty() {
        names.extend(
            read_workloads(&args.files)?
                .into_iter()
                .map(|s| s.workload.name),
        );
    }
    let mut rest = args.args.iter().peekable();
    if let Some(first) = rest.peek() {
        if is_workload_word(first) {
            rest.next();
            if rest.peek().is_none() {
                return Err(UsageError(
                    "name the workloads to delete: `gantry delete workload NAME…`".into(),
                )
                .into());
            }
        } else if !first.contains('/') {
            return Err(UsageError(format!(
                "cannot delete `{first}`: only workloads can be deleted; use `gantry delete workload NAME…`"
            ))
            .into());
        }
    }
    for arg in rest {
        match arg.split_once('/') {
            Some((kind, name)) if is_workload_word(kind) && !name.is_empty() => {
                names.push(name.to_string());
            }
            Some(_) => {
                return Err(UsageError(format!(
                    "cannot delete `{arg}`: only workloads can be deleted (`workload/NAME`)"
                ))
                .into());
            }
            None => names.push(arg.clone()),
        }
    }
    if names.is_empty() {
        return Err(UsageError(
            "nothing to delete: use `gantry delete workload NAME…` or `gantry delete -f FILE`"
                .into(),
        )
        .into());
    }
    Ok(names)
}

/// `gantry delete`.
pub async fn delete(ctx: &mut Ctx, args: DeleteArgs) -> anyhow::Result<()> {
    let names = names_to_delete(&args)?;
    let client = ctx.client().await?;
    let mut api = client.workloads();
    let mut failed = 0;
    for name in &names {
        let request = pb::DeleteWorkloadRequest {
            name: name.clone(),
            expected_revision: None,
        };
        match api.delete(client.request(request)).await {
            Ok(_) => print(&format!("workload/{name} deleted\n"))?,
            Err(status) => {
                failed += 1;
                eprintln!("error: {}", error::api(status, client.address()));
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} workloads could not be deleted", names.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delete_args(args: &[&str]) -> DeleteArgs {
        DeleteArgs {
            args: args.iter().map(|s| s.to_string()).collect(),
            files: Vec::new(),
        }
    }

    #[test]
    fn delete_takes_a_kind_and_names() {
        let names = |a: &[&str]| names_to_delete(&delete_args(a)).map_err(|e| e.to_string());
        assert_eq!(names(&["workload", "a", "b"]).unwrap(), ["a", "b"]);
        assert_eq!(names(&["wl", "a"]).unwrap(), ["a"]);
        assert_eq!(names(&["workload/a", "workloads/b"]).unwrap(), ["a", "b"]);
        assert!(
            names(&["node", "n1"])
                .unwrap_err()
                .contains("only workloads")
        );
        assert!(names(&["workload"]).unwrap_err().contains("NAME"));
        assert!(names(&[]).unwrap_err().contains("nothing to delete"));
        let err = names_to_delete(&delete_args(&["node", "x"])).unwrap_err();
        assert_eq!(error::exit_code(&err), error::EXIT_USAGE);
    }

    #[test]
    fn every_problem_of_every_file_is_listed_before_anything_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.yaml");
        std::fs::write(&good, "kind: Service\nname: web\nimage: web:1\n").unwrap();
        let bad = dir.path().join("bad.yaml");
        std::fs::write(
            &bad,
            "kind: Service\nname: Bad_Name\nimage: ''\n---\nkind: Service\nname: ok\nimage: x\n",
        )
        .unwrap();
        let again = dir.path().join("again.json");
        std::fs::write(
            &again,
            r#"{"kind": "Service", "name": "web", "image": "x"}"#,
        )
        .unwrap();
        let err = read_workloads(&[good.clone(), bad, again])
            .unwrap_err()
            .to_string();
        assert!(err.contains("nothing was sent"), "{err}");
        assert!(err.contains("document 1: name:"), "{err}");
        assert!(err.contains("document 1: image:"), "{err}");
        assert!(err.contains("is also defined in"), "{err}");
        let ok = read_workloads(&[good]).unwrap();
        assert_eq!(ok[0].workload.name, "web");
    }

    #[test]
    fn formats_follow_the_extension_then_the_text() {
        assert_eq!(format_of(Path::new("a.json"), "kind: x"), Format::Json);
        assert_eq!(format_of(Path::new("a.yml"), "{}"), Format::Yaml);
        assert_eq!(format_of(Path::new("-"), "  [{}]"), Format::Json);
        assert_eq!(format_of(Path::new("-"), "kind: Service"), Format::Yaml);
    }
}
