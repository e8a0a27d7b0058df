//! Request bodies in Kubernetes' protobuf encoding, for the kinds kubectl's
//! `create` subcommands send that way (`kubectl create namespace`, `kubectl create
//! secret generic`): client-go's typed clients encode built-in kinds as protobuf
//! and do not fall back to JSON. Decoded into the JSON the rest of the server
//! speaks. Only Namespace and Secret (with the ObjectMeta fields a create carries)
//! are understood; any other kind is 415, and kubectl's JSON paths (`apply`,
//! `edit`, `patch`, `replace`) work for every kind. Answers are always JSON.
//!
//! The envelope: the magic `k8s\0`, then a `runtime.Unknown` message (1: typeMeta
//! {1: apiVersion, 2: kind}, 2: raw, the object's own message).

use base64::Engine;
use serde_json::{Map, Value, json};

const MAGIC: &[u8] = b"k8s\0";

/// How a field of a message becomes JSON.
#[derive(Clone, Copy)]
enum Field {
    Text(&'static str),
    Int(&'static str),
    Bool(&'static str),
    Texts(&'static str),
    TextMap(&'static str),
    BytesMap(&'static str),
    Message(&'static str, fn(u64) -> Option<Field>),
}

fn object_meta(number: u64) -> Option<Field> {
    Some(match number {
        1 => Field::Text("name"),
        2 => Field::Text("generateName"),
        3 => Field::Text("namespace"),
        5 => Field::Text("uid"),
        6 => Field::Text("resourceVersion"),
        7 => Field::Int("generation"),
        11 => Field::TextMap("labels"),
        12 => Field::TextMap("annotations"),
        14 => Field::Texts("finalizers"),
        _ => return None,
    })
}

fn namespace_spec(number: u64) -> Option<Field> {
    (number == 1).then_some(Field::Texts("finalizers"))
}

fn namespace(number: u64) -> Option<Field> {
    Some(match number {
        1 => Field::Message("metadata", object_meta),
        2 => Field::Message("spec", namespace_spec),
        _ => return None,
    })
}

fn secret(number: u64) -> Option<Field> {
    Some(match number {
        1 => Field::Message("metadata", object_meta),
        2 => Field::BytesMap("data"),
        3 => Field::Text("type"),
        4 => Field::TextMap("stringData"),
        5 => Field::Bool("immutable"),
        _ => return None,
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.0.split_first().ok_or("the protobuf body ends inside a number")?;
            self.0 = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("a protobuf number is too long".into())
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let len = usize::try_from(self.varint()?).map_err(|_| "a protobuf length is too large")?;
        if len > self.0.len() {
            return Err("the protobuf body ends inside a field".into());
        }
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(head)
    }

    /// The next (field number, wire type), or None at the end.
    fn key(&mut self) -> Result<Option<(u64, u64)>, String> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        Ok(Some((key >> 3, key & 7)))
    }

    fn skip(&mut self, wire: u64) -> Result<(), String> {
        match wire {
            0 => self.varint().map(drop),
            1 => self.take(8),
            2 => self.bytes().map(drop),
            5 => self.take(4),
            other => Err(format!("protobuf wire type {other} is not supported")),
        }
    }

    fn take(&mut self, n: usize) -> Result<(), String> {
        if n > self.0.len() {
            return Err("the protobuf body ends inside a field".into());
        }
        self.0 = &self.0[n..];
        Ok(())
    }
}

fn text(bytes: &[u8]) -> Result<String, String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| "a protobuf string is not UTF-8".into())
}

/// A map entry (1: key, 2: value).
fn entry(bytes: &[u8]) -> Result<(String, &[u8]), String> {
    let mut reader = Reader(bytes);
    let (mut key, mut value) = (String::new(), &[][..]);
    while let Some((number, wire)) = reader.key()? {
        match (number, wire) {
            (1, 2) => key = text(reader.bytes()?)?,
            (2, 2) => value = reader.bytes()?,
            _ => reader.skip(wire)?,
        }
    }
    Ok((key, value))
}

fn message(bytes: &[u8], fields: fn(u64) -> Option<Field>) -> Result<Value, String> {
    let mut reader = Reader(bytes);
    let mut out = Map::new();
    let push = |out: &mut Map<String, Value>, name: &str, value: Value| {
        if let Value::Array(list) = out.entry(name.to_string()).or_insert_with(|| json!([])) {
            list.push(value);
        }
    };
    let insert = |out: &mut Map<String, Value>, name: &str, key: String, value: Value| {
        if let Value::Object(map) = out.entry(name.to_string()).or_insert_with(|| json!({})) {
            map.insert(key, value);
        }
    };
    while let Some((number, wire)) = reader.key()? {
        let Some(field) = fields(number) else {
            reader.skip(wire)?;
            continue;
        };
        match (field, wire) {
            (Field::Text(name), 2) => {
                out.insert(name.into(), json!(text(reader.bytes()?)?));
            }
            (Field::Int(name), 0) => {
                out.insert(name.into(), json!(reader.varint()? as i64));
            }
            (Field::Bool(name), 0) => {
                out.insert(name.into(), json!(reader.varint()? != 0));
            }
            (Field::Texts(name), 2) => push(&mut out, name, json!(text(reader.bytes()?)?)),
            (Field::TextMap(name), 2) => {
                let (key, value) = entry(reader.bytes()?)?;
                insert(&mut out, name, key, json!(text(value)?));
            }
            (Field::BytesMap(name), 2) => {
                let (key, value) = entry(reader.bytes()?)?;
                insert(&mut out, name, key, json!(base64::engine::general_purpose::STANDARD.encode(value)));
            }
            (Field::Message(name, inner), 2) => {
                out.insert(name.into(), message(reader.bytes()?, inner)?);
            }
            _ => return Err(format!("protobuf field {number} has an unexpected wire type {wire}")),
        }
    }
    Ok(Value::Object(out))
}

/// The JSON of a protobuf-encoded Namespace or Secret. Err: why it cannot be read
/// (the caller answers 415 for a kind not listed here, 400 otherwise).
pub fn decode(body: &[u8]) -> Result<Value, Decoded> {
    let rest =
        body.strip_prefix(MAGIC).ok_or_else(|| Decoded::Malformed("the protobuf body lacks the k8s magic".into()))?;
    let mut reader = Reader(rest);
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    while let Some((number, wire)) = reader.key().map_err(Decoded::Malformed)? {
        match (number, wire) {
            (1, 2) => {
                let mut meta = Reader(reader.bytes().map_err(Decoded::Malformed)?);
                while let Some((n, w)) = meta.key().map_err(Decoded::Malformed)? {
                    match (n, w) {
                        (1, 2) => {
                            api_version = text(meta.bytes().map_err(Decoded::Malformed)?).map_err(Decoded::Malformed)?
                        }
                        (2, 2) => kind = text(meta.bytes().map_err(Decoded::Malformed)?).map_err(Decoded::Malformed)?,
                        _ => meta.skip(w).map_err(Decoded::Malformed)?,
                    }
                }
            }
            (2, 2) => raw = reader.bytes().map_err(Decoded::Malformed)?,
            _ => reader.skip(wire).map_err(Decoded::Malformed)?,
        }
    }
    let fields: fn(u64) -> Option<Field> = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => namespace,
        ("v1", "Secret") => secret,
        _ => return Err(Decoded::Unsupported(format!("{api_version} {kind}"))),
    };
    let mut object = message(raw, fields).map_err(Decoded::Malformed)?;
    object["apiVersion"] = json!(api_version);
    object["kind"] = json!(kind);
    Ok(object)
}

/// Why a protobuf body was not decoded.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    Unsupported(String),
    Malformed(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(number: u64, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![(number << 3 | 2) as u8, bytes.len() as u8];
        out.extend_from_slice(bytes);
        out
    }

    #[test]
    fn a_secret_as_kubectl_create_sends_it() {
        // What `kubectl create secret generic s --from-literal=token=hunter2` encodes.
        let meta = [field(1, b"s"), field(3, b"default")].concat();
        let data = [field(1, b"token"), field(2, b"hunter2")].concat();
        let raw = [field(1, &meta), field(2, &data), field(3, b"Opaque")].concat();
        let type_meta = [field(1, b"v1"), field(2, b"Secret")].concat();
        let body = [MAGIC.to_vec(), field(1, &type_meta), field(2, &raw)].concat();
        assert_eq!(
            decode(&body).unwrap(),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "default"},
                   "data": {"token": "aHVudGVyMg=="}, "type": "Opaque"})
        );
        let pod_meta = [field(1, b"v1"), field(2, b"Pod")].concat();
        let pod = [MAGIC.to_vec(), field(1, &pod_meta)].concat();
        assert!(matches!(decode(&pod), Err(Decoded::Unsupported(_))));
        assert!(matches!(decode(b"k8s\0\x0a\xff"), Err(Decoded::Malformed(_))));
        assert!(matches!(decode(b"{}"), Err(Decoded::Malformed(_))));
    }
}
