//! The shell completions and the manual page are made from the CLI definition (`blkrepl
//! completions SHELL`, `blkrepl man`): each covers every command the binary has.

mod common;

use common::{text, BIN};
use std::io::Write;
use std::process::{Command, Stdio};

fn blkrepl(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(out.status.success(), "blkrepl {args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// The commands `blkrepl --help` lists (clap's own `help` aside).
fn commands() -> Vec<String> {
    let help = blkrepl(&["--help"]);
    let list = help.split("Commands:\n").nth(1).expect("a command list").split("\n\n").next().unwrap();
    let names: Vec<String> = list.lines().filter_map(|l| l.split_whitespace().next()).filter(|n| *n != "help").map(str::to_owned).collect();
    assert!(names.len() >= 12 && names.contains(&"create-md".to_owned()), "{names:?}");
    names
}

#[test]
fn completions_name_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let script = blkrepl(&["completions", shell]);
        for command in commands() {
            // How each script offers a command: a case of the command line, a described word,
            // a completion candidate.
            let offer = match shell {
                "bash" => format!("blkrepl,{command})"),
                "zsh" => format!("'{command}:"),
                _ => format!("-a \"{command}\""),
            };
            assert!(script.contains(&offer), "the {shell} completion does not offer {command}");
        }
    }
}

#[test]
fn the_manual_page_renders_and_describes_every_command() {
    let page = blkrepl(&["man"]);
    assert!(page.contains(".TH blkrepl 8"), "a section 8 page");
    let mut man = Command::new("man")
        .args(["--warnings", "-l", "-"])
        .env("MANWIDTH", "200")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("man runs (man-db: scripts/setup.sh test installs it)");
    man.stdin.take().unwrap().write_all(page.as_bytes()).unwrap();
    let out = man.wait_with_output().unwrap();
    let (shown, warnings) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success() && warnings.is_empty(), "man -l failed or warned: {warnings}");
    for command in commands() {
        assert!(shown.contains(&format!("blkrepl {command}")), "the page lacks `blkrepl {command}`:\n{shown}");
    }
    assert!(shown.contains("EXIT STATUS"), "{shown}");
}

#[test]
fn the_long_version_names_the_peer_protocol_and_the_metadata_format() {
    // What an operator compares before upgrading one node at a time: nodes of different peer
    // protocol versions refuse each other at the handshake.
    let long = blkrepl(&["--version"]);
    let expected = format!(
        "blkrepl {} (peer protocol {}, metadata format {})",
        env!("CARGO_PKG_VERSION"),
        blkrepl::wire::PROTOCOL_VERSION,
        blkrepl::meta::superblock::FORMAT_VERSION
    );
    assert_eq!(long.trim_end(), expected);
    assert_eq!(blkrepl(&["-V"]).trim_end(), format!("blkrepl {}", env!("CARGO_PKG_VERSION")));
}
