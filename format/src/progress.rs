//! Progress of a long command on stderr: an `indicatif` bar when stderr is a terminal,
//! otherwise a plain line at a steady interval (`train: 120/3744 steps (3.2 %), loss
//! 0.1234, 850 images/s, elapsed 2m10s, ETA 1h02m`), so logs written by `tee`, CI or
//! `nohup` show life and an ETA.
//!
//! The interval of the plain lines is [`INTERVAL_ENV`] seconds (default 30).

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Seconds between plain progress lines when stderr is not a terminal.
pub const INTERVAL_ENV: &str = "BYOL_PROGRESS_SECS";

/// Where progress goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Nothing is shown (library callers, tests).
    Hidden,
    /// A bar redrawn in place (stderr is a terminal).
    Bar,
    /// A plain line every interval.
    Lines,
}

impl Mode {
    /// `Bar` when stderr is a terminal, `Lines` otherwise; `Hidden` when `show` is false.
    pub fn detect(show: bool) -> Mode {
        use std::io::IsTerminal;
        if !show {
            Mode::Hidden
        } else if std::io::stderr().is_terminal() {
            Mode::Bar
        } else {
            Mode::Lines
        }
    }
}

struct LineState {
    pos: u64,
    msg: String,
    done: bool,
}

/// What the plain-line printer thread shares with the display.
struct Lines {
    name: String,
    unit: String,
    total: u64,
    start: Instant,
    start_pos: u64,
    state: Mutex<LineState>,
    wake: Condvar,
}

impl Lines {
    /// The plain line for position `pos` with message `msg`.
    fn line(&self, pos: u64, msg: &str) -> String {
        let el = self.start.elapsed().as_secs_f64();
        let done = pos.saturating_sub(self.start_pos) as f64;
        let mut s = format!("{}: {pos}/{} {}", self.name, self.total, self.unit);
        if self.total > 0 {
            s.push_str(&format!(
                " ({:.1} %)",
                100.0 * pos as f64 / self.total as f64
            ));
        }
        if !msg.is_empty() {
            s.push_str(", ");
            s.push_str(msg);
        }
        s.push_str(&format!(", elapsed {}", human_duration(el)));
        if done > 0.0 && pos < self.total {
            let eta = (self.total - pos) as f64 * el / done;
            s.push_str(&format!(", ETA {}", human_duration(eta)));
        }
        s
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LineState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A progress display for `total` units of work (`unit`: "steps", "images", "stages").
/// In the plain mode a thread prints the current line every interval, whether or not
/// the work reported anything since (a slow stage still shows life).
pub struct Progress {
    bar: Option<ProgressBar>,
    lines: Option<Arc<Lines>>,
    printer: Option<std::thread::JoinHandle<()>>,
}

/// `1h02m`, `2m10s`, `7s`.
pub fn human_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// The plain lines' interval: [`INTERVAL_ENV`] seconds, default 30.
fn interval() -> Duration {
    std::env::var(INTERVAL_ENV)
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(30))
}

impl Progress {
    /// A display named `name` (the command) for `total` units, starting at `start`.
    pub fn new(mode: Mode, name: &str, total: u64, unit: &str, start: u64) -> Progress {
        let bar = (mode == Mode::Bar).then(|| {
            let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(&format!(
                    "{name} {{bar:25}} {{pos}}/{{len}} {unit} [{{elapsed_precise}}, ETA {{eta}}] {{msg}}"
                ))
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_position(start);
            b
        });
        let lines = (mode == Mode::Lines).then(|| {
            Arc::new(Lines {
                name: name.to_string(),
                unit: unit.to_string(),
                total,
                start: Instant::now(),
                start_pos: start,
                state: Mutex::new(LineState {
                    pos: start,
                    msg: String::new(),
                    done: false,
                }),
                wake: Condvar::new(),
            })
        });
        let printer = lines.clone().map(|l| {
            let every = interval();
            std::thread::spawn(move || {
                let mut st = l.lock();
                // `done` is checked before every wait, so a finish that comes before the
                // first wait is not missed.
                while !st.done {
                    let (g, timeout) = l
                        .wake
                        .wait_timeout(st, every)
                        .unwrap_or_else(|e| e.into_inner());
                    st = g;
                    if !st.done && timeout.timed_out() {
                        say(&l.line(st.pos, &st.msg));
                    }
                }
            })
        });
        Progress {
            bar,
            lines,
            printer,
        }
    }

    pub fn set_position(&self, pos: u64) {
        if let Some(b) = &self.bar {
            b.set_position(pos);
        }
        if let Some(l) = &self.lines {
            l.lock().pos = pos;
        }
    }

    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
        if let Some(l) = &self.lines {
            l.lock().pos += n;
        }
    }

    /// The message shown after the counts (loss, rate, stage, …).
    pub fn set_message(&self, msg: String) {
        if let Some(b) = &self.bar {
            b.set_message(msg.clone());
        }
        if let Some(l) = &self.lines {
            l.lock().msg = msg;
        }
    }

    /// A line of its own above the bar (or among the plain lines).
    pub fn println(&self, msg: &str) {
        if let Some(b) = &self.bar {
            b.println(msg);
        } else if self.lines.is_some() {
            say(msg);
        }
    }

    /// Clears the bar; the plain mode prints a last line when anything happened.
    pub fn finish(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        if let Some(l) = &self.lines {
            let mut st = l.lock();
            if !st.done && st.pos > l.start_pos {
                say(&l.line(st.pos, &st.msg));
            }
            st.done = true;
            l.wake.notify_all();
        }
        if let Some(h) = self.printer.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(l) = &self.lines {
            l.lock().done = true;
            l.wake.notify_all();
        }
        if let Some(h) = self.printer.take() {
            let _ = h.join();
        }
    }
}

/// Writes a progress line to stderr, ignoring failure: a closed stderr (a launcher or
/// pipe reader that is gone) must not stop the work the line reports on.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_line_has_counts_rate_and_eta() {
        let p = Progress::new(Mode::Lines, "train", 200, "steps", 0);
        let lines = p.lines.as_ref().unwrap();
        let l = lines.line(50, "loss 0.5");
        assert!(
            l.starts_with("train: 50/200 steps (25.0 %), loss 0.5, elapsed "),
            "{l}"
        );
        assert!(l.contains("ETA"), "{l}");
        assert!(!lines.line(200, "").contains("ETA"));
    }

    #[test]
    fn durations_read_like_a_clock() {
        assert_eq!(human_duration(7.2), "7s");
        assert_eq!(human_duration(130.0), "2m10s");
        assert_eq!(human_duration(3720.0), "1h02m");
    }
}
