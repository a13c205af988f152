//! Every `tcplake` command shown in the README and docs (in ```sh blocks) is accepted as written:
//! each is run with `--check-config`, which parses and validates it completely without starting
//! anything. Flags renamed or removed later break this test, not a newcomer's first attempt. (The
//! queries in docs/queries.md are run for real by tests/it/queries.rs.)

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

fn docs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = vec![
        root.join("README.md"),
        root.join("deploy-monolith/README.md"),
        root.join("deploy-split/README.md"),
    ];
    files.extend(
        files_under(&root.join("docs"))
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "md")),
    );
    files
}

/// The logical lines of the ```sh blocks of a Markdown file (continuations joined).
fn shell_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_block = false;
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("```") {
            in_block = t == "```sh" || t == "```bash";
            continue;
        }
        if !in_block {
            continue;
        }
        match line.trim_end().strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

/// Shell words (quotes, `#` comments) by Python's shlex, as a shell would split them.
fn words(line: &str) -> Vec<String> {
    let o = Command::new("python3")
        .args([
            "-c",
            "import json, shlex, sys; print(json.dumps(shlex.split(sys.argv[1], comments=True)))",
            line,
        ])
        .output_bounded()
        .unwrap();
    assert!(o.status.success(), "cannot split: {line}");
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn every_documented_tcplake_command_is_accepted() {
    let mut checked = 0;
    for doc in docs() {
        let text = std::fs::read_to_string(&doc).unwrap();
        for line in shell_lines(&text) {
            let w = words(&line);
            let Some(at) = w
                .iter()
                .position(|x| Path::new(x).file_name().is_some_and(|n| n == "tcplake"))
            else {
                continue;
            };
            let mut args: Vec<String> = w[at + 1..].to_vec();
            // A config file named in the docs is the example one, where it exists.
            for a in args.iter_mut() {
                if a == "/etc/tcplake/tcplake.toml" {
                    *a = Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("../deploy-monolith/tcplake.toml")
                        .display()
                        .to_string();
                }
            }
            if !args.iter().any(|a| a == "--check-config") {
                args.push("--check-config".into());
            }
            // Run where the recorded output a replay example reads exists, as it would for the user.
            let cwd = tempfile::tempdir().unwrap();
            for (i, a) in args.iter().enumerate() {
                let from = match a.strip_prefix("replay:") {
                    Some(f) => Some(f.to_string()),
                    None if a == "--from" => args.get(i + 1).cloned(),
                    None => None,
                };
                if let Some(f) = from.filter(|f| !f.starts_with("s3://") && !f.starts_with('/')) {
                    std::fs::create_dir_all(cwd.path().join(f)).unwrap();
                }
            }
            let o = tcplake_cmd()
                .args(&args)
                .current_dir(cwd.path())
                .output_bounded()
                .unwrap();
            assert!(
                o.status.success(),
                "{}: `{line}` is refused: {}",
                doc.display(),
                stderr(&o)
            );
            checked += 1;
        }
    }
    assert!(checked >= 6, "only {checked} commands found");
}

/// The configuration reference lists every flag the binary accepts (`tcplake --help` is generated
/// from the config struct; this keeps docs/configuration.md from falling behind it).
#[test]
fn the_configuration_reference_lists_every_flag() {
    let reference = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md"),
    )
    .unwrap();
    let help = stdout(&tcplake(&["--help"], &[]));
    let flags: Vec<&str> = help
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches([',', '.', ';', ')']))
        .filter(|w| !matches!(*w, "--help" | "--version"))
        .collect();
    assert!(flags.len() > 20, "{flags:?}");
    let missing: Vec<_> = flags
        .iter()
        .filter(|f| !reference.contains(&format!("`{f}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "not in docs/configuration.md: {missing:?}"
    );
}
