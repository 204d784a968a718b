//! MLflow tracking over its REST API (`/api/2.0/mlflow/…`), from a thread of its own: a
//! run's parameters (the resolved config, flattened), its metrics in batches, tags, and
//! at the end its summary files and `curves.png` as artifacts (the server's artifact
//! proxy, `mlflow server`'s default).
//!
//! Training never waits for the server: rows go through a bounded channel to the
//! tracking thread, which keeps up to [`MAX_PENDING`] metric values while the server is
//! slow or down (the oldest dropped beyond that, said once), retries with a growing
//! pause (bounded), warns once naming the server, and sends what it kept when the
//! server answers again. At the end it has [`FINISH_DEADLINE`] to send the rest and the
//! artifacts. `RUN/mlflow.json` holds the MLflow run's id, so `--resume` continues the
//! same MLflow run. The local run folder is complete either way.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::TrainConfig;

/// Metric values kept while the server does not answer (about 100 bytes each).
pub const MAX_PENDING: usize = 200_000;
/// How long the end of a run may wait for the server to take what is left
/// (`$BYOL_MLFLOW_FINISH_S` seconds when set).
pub const FINISH_DEADLINE: Duration = Duration::from_secs(20);

fn finish_deadline() -> Duration {
    std::env::var("BYOL_MLFLOW_FINISH_S")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s >= 0.0)
        .map_or(FINISH_DEADLINE, Duration::from_secs_f64)
}
/// MLflow's limits per `log-batch` request.
const BATCH_METRICS: usize = 1000;
const BATCH_PARAMS: usize = 100;
/// MLflow's longest parameter value.
const PARAM_CHARS: usize = 6000;

/// `RUN/mlflow.json`: which MLflow run this run folder logs to.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Link {
    tracking_uri: String,
    experiment_id: String,
    run_id: String,
    artifact_uri: String,
}

/// The tracking server to use: `--mlflow URI`, else `$MLFLOW_TRACKING_URI` (an `http://`
/// or `https://` server; a local store such as `file:` or `sqlite:` is not a server and
/// is ignored with a warning).
pub fn tracking_uri(flag: Option<&str>) -> Option<String> {
    if flag.is_some_and(|f| f.trim().is_empty()) {
        eprintln!(
            "byol: warning: --mlflow \"\" names no server; this run is not tracked in MLflow"
        );
        return None;
    }
    let uri = flag
        .map(str::to_string)
        .or_else(|| std::env::var("MLFLOW_TRACKING_URI").ok())
        .filter(|u| !u.trim().is_empty())?;
    let host = uri
        .split_once("://")
        .map_or("", |(_, rest)| rest.trim_matches('/'));
    if (uri.starts_with("http://") || uri.starts_with("https://")) && !host.is_empty() {
        Some(uri.trim_end_matches('/').to_string())
    } else if host.is_empty() && uri.contains("://") {
        eprintln!(
            "byol: warning: MLflow tracking URI {uri:?} names no host (http://HOST:PORT); this run is not tracked in MLflow"
        );
        None
    } else {
        eprintln!(
            "byol: warning: MLflow tracking URI {uri:?} is not an http(s) server; byol logs to MLflow servers only (`mlflow server`), so this run is not tracked there"
        );
        None
    }
}

/// What the training thread sends.
enum Msg {
    Metrics {
        step: u64,
        at_ms: i64,
        values: Vec<(String, f64)>,
    },
    Finish {
        artifacts: Vec<PathBuf>,
        status: &'static str,
    },
}

/// A handle to send metrics to the tracking thread (cheap to clone; never blocks).
#[derive(Clone)]
pub struct MlflowHandle {
    tx: SyncSender<Msg>,
}

impl MlflowHandle {
    /// Queues one row's values at `step`. Never blocks: when the channel is full (the
    /// tracking thread drains it into its own buffer far faster than rows come) or the
    /// thread has ended, the row is dropped; `metrics.jsonl` keeps it.
    pub fn metrics(&self, step: u64, values: Vec<(String, f64)>) {
        let at_ms = now_ms();
        let _dropped_when_full = self.tx.try_send(Msg::Metrics {
            step,
            at_ms,
            values,
        });
    }
}

/// The tracking thread of one run.
pub struct Mlflow {
    handle: MlflowHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Mlflow {
    /// Starts tracking run folder `run` on the server at `uri` (experiment
    /// `$MLFLOW_EXPERIMENT_NAME`, default `byol`), in the background: the MLflow run is
    /// created (or, when `RUN/mlflow.json` names one on the same server, continued), the
    /// config logged as parameters and `tags` set once the server answers.
    pub fn start(
        run: &Path,
        uri: String,
        cfg: &TrainConfig,
        tags: Vec<(String, String)>,
    ) -> Mlflow {
        let (tx, rx) = sync_channel(4096);
        let params = flat_params(cfg);
        let run = run.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("byol-mlflow".into())
            .spawn(move || Worker::new(run, uri, params, tags).run(rx))
            .ok();
        Mlflow {
            handle: MlflowHandle { tx },
            thread,
        }
    }

    pub fn handle(&self) -> MlflowHandle {
        self.handle.clone()
    }

    /// Ends tracking: what is left and `artifacts` (those that exist) are sent within
    /// [`FINISH_DEADLINE`], and the MLflow run is marked `status` (`FINISHED`, `KILLED`,
    /// `FAILED`); this waits for the thread.
    pub fn finish(mut self, artifacts: Vec<PathBuf>, status: &'static str) {
        self.end(artifacts, status);
    }

    fn end(&mut self, artifacts: Vec<PathBuf>, status: &'static str) {
        if let Some(t) = self.thread.take() {
            let _ = self.handle.tx.send(Msg::Finish { artifacts, status });
            let _ = t.join();
        }
    }
}

impl Drop for Mlflow {
    /// A run that ended with an error: what was logged is sent and the MLflow run marked
    /// `FAILED` (within [`FINISH_DEADLINE`]).
    fn drop(&mut self) {
        self.end(Vec::new(), "FAILED");
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

/// The config as MLflow parameters: every leaf under its dotted key (`optim.base_lr`),
/// arrays as JSON, values cut to MLflow's 6000 characters.
fn flat_params(cfg: &TrainConfig) -> Vec<(String, String)> {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, x, out);
                }
            }
            Value::Null => {}
            Value::String(s) => out.push((prefix.into(), s.chars().take(PARAM_CHARS).collect())),
            other => out.push((
                prefix.into(),
                other.to_string().chars().take(PARAM_CHARS).collect(),
            )),
        }
    }
    let mut out = Vec::new();
    walk("", &serde_json::to_value(cfg).unwrap_or_default(), &mut out);
    out
}

/// The tracking thread's state.
struct Worker {
    run: PathBuf,
    uri: String,
    agent: ureq::Agent,
    params: Vec<(String, String)>,
    tags: Vec<(String, String)>,
    link: Option<Link>,
    pending: VecDeque<Value>,
    dropped: u64,
    warned: bool,
    /// When to try the server again after a failure.
    retry_at: Option<Instant>,
    pause: Duration,
}

impl Worker {
    fn new(
        run: PathBuf,
        uri: String,
        params: Vec<(String, String)>,
        tags: Vec<(String, String)>,
    ) -> Worker {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .into();
        Worker {
            run,
            uri,
            agent,
            params,
            tags,
            link: None,
            pending: VecDeque::new(),
            dropped: 0,
            warned: false,
            retry_at: None,
            pause: Duration::from_millis(500),
        }
    }

    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(Msg::Metrics {
                    step,
                    at_ms,
                    values,
                }) => self.keep(step, at_ms, values),
                Ok(Msg::Finish { artifacts, status }) => {
                    self.finish(&artifacts, status);
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.finish(&[], "KILLED");
                    return;
                }
            }
            if self.retry_at.is_none_or(|t| Instant::now() >= t) {
                self.flush();
            }
        }
    }

    fn keep(&mut self, step: u64, at_ms: i64, values: Vec<(String, f64)>) {
        for (key, value) in values.into_iter().filter(|(_, v)| v.is_finite()) {
            if self.pending.len() == MAX_PENDING {
                self.pending.pop_front();
                self.dropped += 1;
                if self.dropped == 1 {
                    eprintln!(
                        "byol: warning: MLflow server {} has not taken the last {MAX_PENDING} metric values; dropping the oldest (metrics.jsonl keeps them all)",
                        self.uri
                    );
                }
            }
            self.pending
                .push_back(json!({"key": key, "value": value, "timestamp": at_ms, "step": step}));
        }
    }

    /// One try: set up the run if not yet, then send what is pending. A failure says
    /// so once and schedules the next try.
    fn flush(&mut self) {
        let r = self.ensure_run().and_then(|()| self.send_pending());
        match r {
            Ok(()) => {
                if self.warned {
                    eprintln!(
                        "byol: MLflow server {} answers again; metrics sent",
                        self.uri
                    );
                    self.warned = false;
                }
                self.retry_at = None;
                self.pause = Duration::from_millis(500);
            }
            Err(e) => {
                if !self.warned {
                    eprintln!(
                        "byol: warning: MLflow server {} did not take the run's data ({e}); training goes on, metrics are kept and sent when it answers",
                        self.uri
                    );
                    self.warned = true;
                }
                self.retry_at = Some(Instant::now() + self.pause);
                self.pause = (self.pause * 2).min(Duration::from_secs(30));
            }
        }
    }

    fn finish(&mut self, artifacts: &[PathBuf], status: &str) {
        let limit = finish_deadline();
        let deadline = Instant::now() + limit;
        let mut pause = Duration::from_millis(250);
        loop {
            let r = self
                .ensure_run()
                .and_then(|()| self.send_pending())
                .and_then(|()| self.send_artifacts(artifacts))
                .and_then(|()| self.set_status(status));
            match r {
                Ok(()) => return,
                Err(e) if Instant::now() + pause >= deadline => {
                    eprintln!(
                        "byol: warning: MLflow server {} did not take the end of the run within {} s ({e}); {} metric values not sent; the run folder has everything",
                        self.uri,
                        limit.as_secs(),
                        self.pending.len()
                    );
                    return;
                }
                Err(_) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn api(&self, path: &str) -> String {
        format!("{}/api/2.0/mlflow/{path}", self.uri)
    }

    /// POSTs `body` as JSON; the answer's JSON, or why not.
    fn post(&self, path: &str, body: &Value) -> std::result::Result<Value, String> {
        let r = self
            .agent
            .post(&self.api(path))
            .header("Content-Type", "application/json")
            .send(body.to_string());
        answer(r)
    }

    /// The MLflow run: continued from `RUN/mlflow.json` (same server), else created in
    /// the experiment, with the params and tags; the link written.
    fn ensure_run(&mut self) -> std::result::Result<(), String> {
        if self.link.is_some() {
            return Ok(());
        }
        let path = self.run.join("mlflow.json");
        let saved: Option<Link> = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .filter(|l: &Link| l.tracking_uri == self.uri);
        let link = match saved {
            Some(l) => {
                self.post(
                    "runs/update",
                    &json!({"run_id": l.run_id, "status": "RUNNING"}),
                )?;
                l
            }
            None => {
                let experiment_id = self.experiment()?;
                let name = self
                    .run
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "byol".into());
                let tags: Vec<Value> = self
                    .tags
                    .iter()
                    .map(|(k, v)| json!({"key": k, "value": v}))
                    .collect();
                let v = self.post(
                    "runs/create",
                    &json!({"experiment_id": experiment_id, "run_name": name,
                            "start_time": now_ms(), "tags": tags}),
                )?;
                let info = &v["run"]["info"];
                let l = Link {
                    tracking_uri: self.uri.clone(),
                    experiment_id,
                    run_id: info["run_id"]
                        .as_str()
                        .ok_or("no run_id in the answer")?
                        .into(),
                    artifact_uri: info["artifact_uri"].as_str().unwrap_or_default().into(),
                };
                let text = serde_json::to_string_pretty(&l).unwrap_or_default();
                byol_format::fs::write_atomic(&path, text.as_bytes()).map_err(|e| e.to_string())?;
                l
            }
        };
        for chunk in self.params.chunks(BATCH_PARAMS) {
            let params: Vec<Value> = chunk
                .iter()
                .map(|(k, v)| json!({"key": k, "value": v}))
                .collect();
            // A resumed run may change a resumable key: MLflow keeps a parameter's first
            // value and refuses another; that is not an error for the run.
            let _ = self.post(
                "runs/log-batch",
                &json!({"run_id": link.run_id, "params": params}),
            );
        }
        self.link = Some(link);
        Ok(())
    }

    /// The experiment's id, created when missing.
    fn experiment(&self) -> std::result::Result<String, String> {
        let name = std::env::var("MLFLOW_EXPERIMENT_NAME").unwrap_or_else(|_| "byol".into());
        let r = self
            .agent
            .get(&self.api("experiments/get-by-name"))
            .query("experiment_name", &name)
            .call();
        if let Ok(v) = answer(r) {
            if let Some(id) = v["experiment"]["experiment_id"].as_str() {
                return Ok(id.to_string());
            }
        }
        let v = self.post("experiments/create", &json!({"name": name}))?;
        v["experiment_id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("creating experiment {name:?}: {v}"))
    }

    fn send_pending(&mut self) -> std::result::Result<(), String> {
        let run_id = self
            .link
            .as_ref()
            .map(|l| l.run_id.clone())
            .unwrap_or_default();
        while !self.pending.is_empty() {
            let n = self.pending.len().min(BATCH_METRICS);
            let metrics: Vec<Value> = self.pending.iter().take(n).cloned().collect();
            self.post(
                "runs/log-batch",
                &json!({"run_id": run_id, "metrics": metrics}),
            )?;
            self.pending.drain(..n);
        }
        Ok(())
    }

    /// Uploads the files through the server's artifact proxy
    /// (`/api/2.0/mlflow-artifacts/artifacts/…`).
    fn send_artifacts(&self, files: &[PathBuf]) -> std::result::Result<(), String> {
        let Some(link) = &self.link else {
            return Ok(());
        };
        let base = link
            .artifact_uri
            .strip_prefix("mlflow-artifacts:/")
            .map(|p| p.trim_start_matches('/').to_string())
            .unwrap_or_else(|| format!("{}/{}/artifacts", link.experiment_id, link.run_id));
        for f in files.iter().filter(|f| f.is_file()) {
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let bytes = std::fs::read(f).map_err(|e| format!("reading {}: {e}", f.display()))?;
            let url = format!(
                "{}/api/2.0/mlflow-artifacts/artifacts/{base}/{name}",
                self.uri
            );
            answer(self.agent.put(&url).send(&bytes[..]))?;
        }
        Ok(())
    }

    fn set_status(&self, status: &str) -> std::result::Result<(), String> {
        let Some(link) = &self.link else {
            return Ok(());
        };
        self.post(
            "runs/update",
            &json!({"run_id": link.run_id, "status": status, "end_time": now_ms()}),
        )
        .map(|_| ())
    }
}

/// The JSON of a 2xx answer, or why there is none.
fn answer(
    r: std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> std::result::Result<Value, String> {
    let mut resp = r.map_err(|e| e.to_string())?;
    let status = resp.status();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    if !status.is_success() {
        let cut: String = text.chars().take(300).collect();
        return Err(format!("HTTP {status}: {cut}"));
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The tags every tracked run gets: byol's version, the git commit of the checkout the
/// binary was built in (when it is one), the CPU or GPU, the precision and world size.
pub fn run_tags(device: &str, precision: &str, world: usize) -> Vec<(String, String)> {
    let mut tags = vec![
        (
            "byol.version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
        ("byol.device".into(), device.into()),
        ("byol.precision".into(), precision.into()),
        ("byol.world_size".into(), world.to_string()),
        ("mlflow.source.name".into(), "byol".into()),
    ];
    if let Some(cpu) = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|t| {
        t.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_string())
    }) {
        tags.push(("byol.cpu".into(), cpu));
    }
    let commit = std::env::current_exe().ok().and_then(|exe| {
        let o = std::process::Command::new("git")
            .arg("-C")
            .arg(exe.parent()?)
            .args(["rev-parse", "HEAD"])
            .output()
            .ok()?;
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
    });
    if let Some(c) = commit {
        tags.push(("mlflow.source.git.commit".into(), c));
    }
    tags
}

/// The files of a run folder sent as artifacts at its end (those that exist).
pub fn run_artifacts(run: &Path) -> Vec<PathBuf> {
    [
        "config.toml",
        "data.json",
        "metrics.jsonl",
        "curves.png",
        "eval.json",
        "finetune.json",
        "label_keys.txt",
    ]
    .iter()
    .map(|n| run.join(n))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::tracking_uri;

    #[test]
    fn only_http_servers_with_a_host_are_tracking_uris() {
        assert_eq!(
            tracking_uri(Some("http://127.0.0.1:5000/")).as_deref(),
            Some("http://127.0.0.1:5000")
        );
        for bad in [
            "",
            "http://",
            "https:///",
            "file:./mlruns",
            "sqlite:///x.db",
        ] {
            assert_eq!(tracking_uri(Some(bad)), None, "{bad}");
        }
    }
}
