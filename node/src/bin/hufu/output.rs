//! Standard output for a command line tool: a command whose output goes
//! into `| head` ends quietly when its reader goes, as `cat` or `grep`
//! would, instead of panicking at its next print.
//!
//! Rust ignores SIGPIPE, so a write to a pipe whose reader is gone is an
//! error (`println!` panics at it). Restoring the signal's default action
//! is not an answer: a socket written with `writev` raises the same
//! signal, and a command the node hangs up on (a refused certificate,
//! while the command is already sending its first call) would end without
//! a word. Only a write to standard output is treated as the end here;
//! every other broken pipe stays an error the command explains.

use std::io::{self, Write};

/// The exit status a shell reports for a command ended by SIGPIPE.
const ENDED_BY_SIGPIPE: i32 = 128 + 13;

/// Standard output, through which every line the command prints goes. A
/// write to it never returns an error: when standard output's reader is
/// gone the command ends quietly, and when it fails otherwise (a full disk
/// behind a redirect) the command cannot say what it was asked to, so it
/// stops and says why.
pub struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(ended_unless_written(io::stdout().write(buf)))
    }

    fn flush(&mut self) -> io::Result<()> {
        ended_unless_written(io::stdout().flush());
        Ok(())
    }
}

fn ended_unless_written<T>(result: io::Result<T>) -> T {
    match result {
        Ok(written) => written,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => std::process::exit(ENDED_BY_SIGPIPE),
        Err(e) => {
            eprintln!("hufu: cannot write to standard output: {e}");
            std::process::exit(1)
        }
    }
}

/// `println!` through [`Stdout`] (which never fails: see there).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!($crate::output::Stdout, $($arg)*);
    }};
}

/// `print!` through [`Stdout`] (which never fails: see there).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!($crate::output::Stdout, $($arg)*);
    }};
}

pub(crate) use {out, outln};
