//! `mirrorvol manpage`: mirrorvol(8) in roff, generated from the clap
//! definitions (clap_mangen) so that it never disagrees with `--help`: the
//! global options, then a section per command with its synopsis, its
//! description and its options, then the exit statuses, the environment,
//! the files and examples, which are written here.

use std::io::Write;

use clap::CommandFactory;

use super::Cli;

/// The exit statuses, as `Error::exit_code` gives them.
const EXIT_STATUS: &str = r#".SH "EXIT STATUS"
.TP
\fB0\fR
The command did what it was asked.
.TP
\fB1\fR
The operation failed (an I/O error, damaged metadata, a daemon that did not answer).
.TP
\fB2\fR
The request was refused or malformed; nothing changed on any disk. The reason is one sentence on standard error naming the object.
.TP
\fB3\fR
\fBstatus \-\-test\fR or \fBstatus \-x\fR: the group is degraded (a volume without full redundancy or resynching, a disk out of service or with errors), but every volume serves its data.
.TP
\fB4\fR
\fBstatus \-\-test\fR or \fBstatus \-x\fR: a volume serves no data (failed, split between two sides of the group, or waiting on its disks).
"#;

const ENVIRONMENT: &str = r#".SH ENVIRONMENT
.TP
\fBMIRRORVOL_DISKS\fR
The group's disks when \fB\-\-disks\fR is not given: paths separated by commas; a directory stands for every file and block device in it.
.TP
\fBMIRRORVOL_RUN_DIR\fR
Where \fBserve\fR records its pid and control socket (default \fI/run/mirrorvol\fR).
.TP
\fBMIRRORVOL_HOST_ID_FILE\fR
Where this host's id is kept (default \fI/var/lib/mirrorvol/host\-id\fR).
.TP
\fBMIRRORVOL_IO_ENGINE\fR
\fBuring\fR or \fBthreads\fR, as \fB\-\-io\-engine\fR.
.TP
\fBMIRRORVOL_IO_TIMEOUT\fR
As \fB\-\-io\-timeout\fR: how long a request to a disk may take before the disk is failed.
.TP
\fBMIRRORVOL_REMOTE_IO_TIMEOUT\fR
As \fB\-\-remote\-io\-timeout\fR: the same for disks that are NBD exports (5 s by default).
.TP
\fBMIRRORVOL_LOG\fR
What is logged on standard error, as a tracing filter (for example \fBinfo\fR or \fBmirrorvol=debug\fR).
"#;

const FILES: &str = r#".SH FILES
.TP
\fI/run/mirrorvol/GROUP\-UUID.sock\fR, \fI/run/mirrorvol/GROUP\-UUID.pid\fR
The control socket and pid file of the \fBserve\fR holding a group: every other command sends its request there while it runs.
.TP
\fI/var/lib/mirrorvol/host\-id\fR
This host's random id, written in the claim a holder keeps on the disks.
.TP
\fI/etc/mirrorvol/GROUP.conf\fR
The disks of a group that \fBmirrorvol@GROUP.service\fR serves at boot (see contrib/ in the sources).
"#;

const EXAMPLES: &str = r#".SH EXAMPLES
Three disks on three controllers, a two\-way mirror, a failed disk replaced and a copy broken off:
.PP
.nf
.RS
truncate \-s 1G a.img b.img c.img
export MIRRORVOL_DISKS=a.img,b.img,c.img
mirrorvol init a.img \-\-controller ctrl0 \-\-group home
mirrorvol init b.img \-\-controller ctrl1
mirrorvol init c.img \-\-controller ctrl2
mirrorvol create data \-\-size 256M \-\-mirror
mirrorvol copy backup.tar vol:data
mirrorvol fail b.img
mirrorvol repair data
mirrorvol break data \-\-disk c.img \-\-new\-name snap
mirrorvol status \-x
.RE
.fi
.PP
Serve every volume over NBD and put a filesystem on one, without the kernel's nbd module:
.PP
.nf
.RS
mirrorvol serve \-\-listen unix:/run/mirrorvol.sock &
nbdfuse /mnt/data\-nbd 'nbd+unix:///data?socket=/run/mirrorvol.sock' &
dev=$(losetup \-\-find \-\-show /mnt/data\-nbd/nbd)
mkfs.ext4 \-q "$dev" && mount "$dev" /mnt/data
.RE
.fi
.PP
Watch a group from a script:
.PP
.nf
.RS
mirrorvol status \-x || mail \-s "mirror degraded" root < /dev/null
.RE
.fi
"#;

const SEE_ALSO: &str = r#".SH "SEE ALSO"
\fBmdadm\fR(8), \fBzpool\fR(8), \fBlvmraid\fR(7), \fBnbdinfo\fR(1), \fBnbdfuse\fR(1), \fBqemu\-img\fR(1)
"#;

/// Renders the whole page.
pub fn render() -> std::io::Result<Vec<u8>> {
    let cli = Cli::command();
    let top = clap_mangen::Man::new(cli.clone())
        .section("8")
        .date(concat!("version ", env!("CARGO_PKG_VERSION")))
        .source("mirrorvol")
        .manual("System Administration");
    let mut page = Vec::new();
    top.render_title(&mut page)?;
    top.render_name_section(&mut page)?;
    top.render_synopsis_section(&mut page)?;
    top.render_description_section(&mut page)?;
    writeln!(
        page,
        ".PP\nEach command below has its own section. A command that changes the group records itself in the group's history (\\fBmirrorvol history\\fR); while \\fBserve\\fR holds the group, every command is sent to it through its control socket."
    )?;
    top.render_options_section(&mut page)?;
    for sub in cli.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("mirrorvol {}", sub.get_name());
        let man = clap_mangen::Man::new(sub.clone().bin_name(&name));
        writeln!(page, ".SH \"{}\"", roff_text(&name.to_uppercase()))?;
        let mut parts = Vec::new();
        man.render_synopsis_section(&mut parts)?;
        man.render_description_section(&mut parts)?;
        if sub.get_arguments().any(|a| !a.is_hide_set()) {
            man.render_options_section(&mut parts)?;
        }
        // The command's own headings become subsections of its section.
        let parts = String::from_utf8_lossy(&parts)
            .lines()
            .filter(|l| *l != ".SH SYNOPSIS")
            .map(|l| match l.strip_prefix(".SH ") {
                Some("DESCRIPTION") => ".PP\n".to_string(),
                Some(heading) => format!(".SS {}\n", titled(heading)),
                None => format!("{l}\n"),
            })
            .collect::<String>();
        page.extend_from_slice(parts.as_bytes());
    }
    for section in [EXIT_STATUS, ENVIRONMENT, FILES, EXAMPLES, SEE_ALSO] {
        page.extend_from_slice(section.as_bytes());
    }
    Ok(page)
}

/// "OPTIONS" as "Options".
fn titled(heading: &str) -> String {
    let mut chars = heading.chars();
    match chars.next() {
        Some(first) => first.to_string() + &chars.as_str().to_lowercase(),
        None => String::new(),
    }
}

/// Text for a roff line: hyphens as \- (a minus, which man pages want in
/// command names), backslashes doubled.
fn roff_text(s: &str) -> String {
    s.replace('\\', "\\\\").replace('-', "\\-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_a_section_per_command_and_the_exit_statuses() {
        let page = String::from_utf8(render().unwrap()).unwrap();
        assert!(page.contains("\n.TH mirrorvol 8 "), "{}", &page[..120]);
        for sub in Cli::command().get_subcommands() {
            if sub.get_name() == "help" {
                continue;
            }
            let heading = format!(
                ".SH \"MIRRORVOL {}\"",
                roff_text(&sub.get_name().to_uppercase())
            );
            assert!(page.contains(&heading), "no section {heading}");
        }
        for section in [".SH \"EXIT STATUS\"", ".SH EXAMPLES", ".SH ENVIRONMENT"] {
            assert!(page.contains(section), "no {section}");
        }
        // A command's options are in its section: --region-size under init.
        let init = page.find(".SH \"MIRRORVOL INIT\"").unwrap();
        let next = init + 1 + page[init + 1..].find(".SH ").unwrap();
        assert!(
            page[init..next].contains("region\\-size"),
            "{}",
            &page[init..next]
        );
    }
}
