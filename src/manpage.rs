//! The manual page blkrepl(8), made from the CLI definition so that it never lists a command or
//! flag the binary lacks. One page describes every command in place (as drbdadm(8) does):
//! clap_mangen alone would list the commands as references to pages of their own.

use clap_mangen::Man;
use std::io::{self, Write};

/// What the CLI's own help does not say: exit codes, files and the neighbouring pages.
const TAIL: &str = r#".SH EXIT STATUS
0 success; 1 failure (the message says what and what to do); 2 usage error; 3 the resource is not
up on this node; 10 configuration error; 11 refused by the resource's state; 12 device in use;
13 permission denied; 14 no quorum.
.SH FILES
.TP
/etc/blkrepl/\fIRESOURCE\fR.toml
The resource file: its keys are described in /usr/share/doc/blkrepl/OPERATIONS.md.
.TP
/run/blkrepl/\fIRESOURCE\fR.\fINODE\fR.{sock,lock,log,ublk}
The daemon's control socket, lock (holding its pid), log when started by \fBup\fR, and ublk
device number.
.SH SEE ALSO
\fBsystemctl\fR(1) with the unit blkrepl@\fIRESOURCE\fR.service; the Pacemaker resource agent
ocf:blkrepl:blkrepl.
"#;

/// Writes the page (roff) for `cli`, the top-level command, in section 8.
pub fn render(cli: clap::Command, out: &mut dyn Write) -> io::Result<()> {
    let name = cli.get_name().to_owned();
    let page = Man::new(cli.clone()).section("8");
    // The title carries the preamble (string definitions) that every render repeats.
    page.render_title(out)?;
    out.write_all(&section(|w| page.render_name_section(w), Heading::Keep)?)?;
    out.write_all(&section(|w| page.render_synopsis_section(w), Heading::Keep)?)?;
    out.write_all(&section(|w| page.render_description_section(w), Heading::Keep)?)?;
    out.write_all(&section(|w| page.render_options_section(w), Heading::Keep)?)?;
    writeln!(out, ".SH COMMANDS")?;
    for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
        // Built alone, the command keeps its own arguments only (the global options are above).
        let bin = format!("{name} {}", sub.get_name());
        let man = Man::new(sub.clone().bin_name(&bin).disable_help_flag(true));
        writeln!(out, ".SS \"{bin}\"")?;
        out.write_all(&section(|w| man.render_synopsis_section(w), Heading::Drop)?)?;
        writeln!(out, ".PP")?;
        out.write_all(&section(|w| man.render_description_section(w), Heading::Drop)?)?;
        let options = section(|w| man.render_options_section(w), Heading::Drop)?;
        if !options.is_empty() {
            writeln!(out, ".PP")?;
            out.write_all(&options)?;
        }
    }
    out.write_all(TAIL.as_bytes())
}

/// Whether a section keeps its `.SH` heading; a command's sections go under its `.SS` without.
#[derive(PartialEq)]
enum Heading {
    Keep,
    Drop,
}

/// One rendered section from its `.SH` heading on: each render starts with the preamble again.
fn section(render: impl FnOnce(&mut Vec<u8>) -> io::Result<()>, heading: Heading) -> io::Result<Vec<u8>> {
    let mut text = Vec::new();
    render(&mut text)?;
    let text = String::from_utf8_lossy(&text);
    let mut lines = text.lines().skip_while(|line| !line.starts_with(".SH "));
    if heading == Heading::Drop {
        lines.next();
    }
    Ok(lines.flat_map(|line| [line, "\n"]).collect::<String>().into_bytes())
}
