//! `--monitor`: a QMP monitor on a chardev. One client at a time, as a
//! QEMU socket chardev serves them: greeting, capabilities negotiation,
//! then commands, each answered by a `return` or an `error` (with the
//! client's `id` echoed), events written before the reply that caused them.

use super::chardev::{ChardevListener, Stream};
use super::daemon::Daemon;
use crate::error::{CliError, CliResult};
use crate::object::Props;
use serde_json::{json, Map, Value};
use std::io::{BufReader, Write};
use std::sync::Arc;

/// The commands answered, for `query-commands`.
const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "query-block-exports",
    "block-export-add",
    "block-export-del",
    "nbd-server-stop",
    "quit",
];

/// Parses `--monitor [chardev=]ID[,mode=control][,pretty=on|off]` and
/// starts serving it.
pub fn start(
    arg: &str,
    listener: impl FnOnce(&str) -> CliResult<ChardevListener>,
    daemon: Arc<Daemon>,
) -> CliResult<()> {
    let mut p = Props::from_arg(arg, Some("chardev"))?;
    let id = p.require("chardev")?;
    if let Some(mode) = p.take("mode") {
        if mode != "control" {
            return Err(CliError::new("Only QMP (mode=control) monitors are supported"));
        }
    }
    let pretty = p.take_bool("pretty")?.unwrap_or(false);
    p.take("id");
    p.finish()?;
    let listener = listener(&id)?;
    std::thread::Builder::new()
        .name("qmp".into())
        .spawn(move || loop {
            match listener.accept() {
                // A client's failure ends its session only.
                Ok(stream) => {
                    let _ = Session { daemon: &daemon, pretty, ready: false }.run(stream);
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        })
        .map_err(|e| CliError::new(format!("starting the monitor: {e}")))?;
    Ok(())
}

struct Session<'a> {
    daemon: &'a Daemon,
    pretty: bool,
    /// Capabilities negotiation is over.
    ready: bool,
}

/// A QMP error reply's class and description.
struct QmpError(&'static str, String);

impl From<CliError> for QmpError {
    fn from(e: CliError) -> Self {
        QmpError("GenericError", e.msg)
    }
}

impl Session<'_> {
    fn run(&mut self, stream: Box<dyn Stream>) -> std::io::Result<()> {
        let mut out = stream.clone_box()?;
        let version = json!({"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": concat!("oxcow ", env!("CARGO_PKG_VERSION"))});
        self.send(&mut out, &json!({"QMP": {"version": version, "capabilities": ["oob"]}}))?;
        let reader = BufReader::new(stream);
        for value in serde_json::Deserializer::from_reader(reader).into_iter::<Value>() {
            let value = match value {
                Ok(v) => v,
                Err(e) => {
                    // The stream cannot be resynchronised: answer and hang up.
                    let err = json!({"error": {"class": "GenericError", "desc": format!("JSON parse error, {e}")}});
                    return self.send(&mut out, &err);
                }
            };
            let id = value.get("id").cloned();
            let mut events = Vec::new();
            let mut reply = match self.execute(&value, &mut events) {
                Ok(r) => json!({ "return": r }),
                Err(QmpError(class, desc)) => json!({"error": {"class": class, "desc": desc}}),
            };
            if let (Some(id), Some(obj)) = (id, reply.as_object_mut()) {
                obj.insert("id".into(), id);
            }
            for e in events {
                self.send(&mut out, &e)?;
            }
            self.send(&mut out, &reply)?;
            if value.get("execute").and_then(Value::as_str) == Some("quit") && reply.get("return").is_some() {
                self.daemon.request_quit();
            }
        }
        Ok(())
    }

    fn send(&self, out: &mut Box<dyn Stream>, v: &Value) -> std::io::Result<()> {
        let mut text = if self.pretty { serde_json::to_string_pretty(v) } else { serde_json::to_string(v) }
            .map_err(std::io::Error::other)?;
        text.push_str("\r\n");
        out.write_all(text.as_bytes())?;
        out.flush()
    }

    fn execute(&mut self, v: &Value, events: &mut Vec<Value>) -> Result<Value, QmpError> {
        let Some(obj) = v.as_object() else {
            return Err(QmpError("GenericError", "QMP input must be a JSON object".into()));
        };
        if obj.contains_key("exec-oob") {
            return Err(QmpError("GenericError", "Out-of-band execution is not supported".into()));
        }
        let Some(cmd) = obj.get("execute").and_then(Value::as_str) else {
            return Err(QmpError("GenericError", "QMP input lacks member 'execute'".into()));
        };
        let empty = Value::Object(Map::new());
        let args = obj.get("arguments").unwrap_or(&empty);
        if !self.ready {
            if cmd != "qmp_capabilities" {
                return Err(QmpError(
                    "CommandNotFound",
                    "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
                ));
            }
            self.ready = true;
            return Ok(json!({}));
        }
        let props = || -> Result<Props, QmpError> { Ok(Props::from_pairs(Props::from_json(args)?)) };
        let d = self.daemon;
        match cmd {
            "qmp_capabilities" => {
                Err(QmpError("CommandNotFound", "Capabilities negotiation is already complete, command ignored".into()))
            }
            "query-version" => Ok(
                json!({"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": concat!("oxcow ", env!("CARGO_PKG_VERSION"))}),
            ),
            "query-commands" => Ok(Value::Array(COMMANDS.iter().map(|c| json!({ "name": c })).collect())),
            "query-block-exports" => {
                props()?.finish()?;
                Ok(d.query_exports())
            }
            "block-export-add" => {
                d.add_export(props()?)?;
                Ok(json!({}))
            }
            "block-export-del" => {
                let mut p = props()?;
                let id = p.require("id")?;
                let hard = p.take_enum("mode", &[("safe", false), ("hard", true)])?.unwrap_or(false);
                p.finish()?;
                d.del_export(&id, hard)?;
                events.push(event("BLOCK_EXPORT_DELETED", json!({ "id": id })));
                Ok(json!({}))
            }
            "nbd-server-stop" => {
                props()?.finish()?;
                d.stop_nbd()?;
                Ok(json!({}))
            }
            "quit" => {
                props()?.finish()?;
                Ok(json!({}))
            }
            other => Err(QmpError("CommandNotFound", format!("The command {other} has not been found"))),
        }
    }
}

fn event(name: &str, data: Value) -> Value {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    json!({
        "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
        "event": name,
        "data": data,
    })
}
