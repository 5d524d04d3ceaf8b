//! Reading `torch.save` files (`.pt`, `.pth`): a zip archive holding `data.pkl` (a pickle
//! of the object) and one raw little-endian storage per tensor under `data/<key>`.
//!
//! The pickle is interpreted by a small stack machine that knows only what a `state_dict`
//! needs: dicts, lists, tuples, strings, numbers, and the constructors
//! `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_parameter` and the `torch.*Storage` types. Any other global (the
//! way a malicious pickle runs code) is refused by name; nothing is ever executed or
//! imported. A checkpoint dict that wraps the weights under `state_dict`, `model` or
//! `model_state_dict` is unwrapped.

use super::NamedTensors;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// Element types of torch storages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StorageType {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageType {
    fn from_name(name: &str) -> Option<StorageType> {
        Some(match name {
            "FloatStorage" => StorageType::F32,
            "DoubleStorage" => StorageType::F64,
            "HalfStorage" => StorageType::F16,
            "BFloat16Storage" => StorageType::BF16,
            "LongStorage" => StorageType::I64,
            "IntStorage" => StorageType::I32,
            "ShortStorage" => StorageType::I16,
            "CharStorage" => StorageType::I8,
            "ByteStorage" => StorageType::U8,
            "BoolStorage" => StorageType::Bool,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            StorageType::F64 | StorageType::I64 => 8,
            StorageType::F32 | StorageType::I32 => 4,
            StorageType::F16 | StorageType::BF16 | StorageType::I16 => 2,
            StorageType::I8 | StorageType::U8 | StorageType::Bool => 1,
        }
    }

    fn read(self, b: &[u8]) -> f32 {
        match self {
            StorageType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            StorageType::F64 => f64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as f32,
            StorageType::F16 => super::f16_to_f32(u16::from_le_bytes([b[0], b[1]])),
            StorageType::BF16 => f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16),
            StorageType::I64 => i64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as f32,
            StorageType::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
            StorageType::I16 => i16::from_le_bytes([b[0], b[1]]) as f32,
            StorageType::I8 => b[0] as i8 as f32,
            StorageType::U8 | StorageType::Bool => b[0] as f32,
        }
    }
}

/// A value on the pickle machine's stack. Scalars and bytes are kept only to be named in
/// error messages.
#[derive(Clone, Debug)]
#[allow(dead_code)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// A whitelisted callable `module.name`.
    Global(String),
    /// A `torch.*Storage` type named in a persistent id.
    StorageClass(StorageType),
    /// A storage reference from a persistent id.
    Storage {
        ty: StorageType,
        key: String,
    },
    /// A tensor view of a storage.
    Tensor {
        ty: StorageType,
        key: String,
        offset: usize,
        size: Vec<usize>,
        stride: Vec<usize>,
    },
    Mark,
}

const ALLOWED_GLOBALS: [&str; 4] = [
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch.Size",
];

/// Reads the named tensors of a `torch.save` zip archive.
pub(super) fn load(path: &Path, bytes: &[u8]) -> Result<NamedTensors> {
    let bad = |msg: String| Error::Format {
        path: path.to_path_buf(),
        msg,
    };
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| bad(format!("not a readable torch.save zip archive ({e})")))?;
    let pkl_name = zip
        .file_names()
        .find(|n| n.ends_with("/data.pkl") || *n == "data.pkl")
        .map(str::to_string)
        .ok_or_else(|| bad("no data.pkl inside: not a file written by torch.save".into()))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let mut pickle = Vec::new();
    zip.by_name(&pkl_name)
        .and_then(|mut f| f.read_to_end(&mut pickle).map_err(Into::into))
        .map_err(|e| bad(format!("cannot read {pkl_name}: {e}")))?;
    let root = Machine::default()
        .run(&pickle)
        .map_err(|msg| bad(format!("{pkl_name}: {msg}")))?;
    let entries = state_dict_entries(root).map_err(bad)?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        let Value::Tensor {
            ty,
            key,
            offset,
            size,
            stride,
        } = value
        else {
            return Err(bad(format!(
                "entry {name:?} is not a tensor; only state_dicts of tensors can be loaded"
            )));
        };
        if !storages.contains_key(&key) {
            let mut data = Vec::new();
            let member = format!("{prefix}data/{key}");
            zip.by_name(&member)
                .and_then(|mut f| f.read_to_end(&mut data).map_err(Into::into))
                .map_err(|e| bad(format!("tensor {name}: cannot read {member}: {e}")))?;
            storages.insert(key.clone(), data);
        }
        let data = &storages[&key];
        // Check the view against its storage before allocating anything for it.
        let elems = data.len() / ty.size();
        let numel = crate::shape::checked_numel(&size)
            .filter(|&n| n <= elems)
            .ok_or_else(|| {
                bad(format!(
                    "tensor {name}: its size {size:?} asks for more elements than its storage holds ({elems}); the file is corrupt (views that repeat storage elements are not loaded)"
                ))
            })?;
        if numel > 0 {
            let last = size.iter().zip(&stride).try_fold(offset, |at, (&n, &s)| {
                at.checked_add((n - 1).checked_mul(s)?)
            });
            if last.is_none_or(|l| l >= elems) {
                return Err(bad(format!(
                    "tensor {name}: its size {size:?}, stride {stride:?} and offset {offset} reach past the end of its storage ({elems} elements); the file is truncated or corrupt"
                )));
            }
        }
        let mut values = Vec::with_capacity(numel);
        let mut index = vec![0usize; size.len()];
        for _ in 0..numel {
            let at = offset + index.iter().zip(&stride).map(|(i, s)| i * s).sum::<usize>();
            let b = data.get(at * ty.size()..(at + 1) * ty.size()).ok_or_else(|| {
                bad(format!(
                    "tensor {name}: element {at} lies past the end of its storage ({} bytes); the file is truncated or corrupt",
                    data.len()
                ))
            })?;
            values.push(ty.read(b));
            for d in (0..size.len()).rev() {
                index[d] += 1;
                if index[d] < size[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        out.push((name, Tensor::from_vec(values, size)?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The `(name, tensor)` pairs of the loaded object: a dict of tensors, or a checkpoint dict
/// holding one under a usual key.
fn state_dict_entries(root: Value) -> std::result::Result<Vec<(String, Value)>, String> {
    let Value::Dict(items) = root else {
        return Err(
            "the file does not hold a dict; save `model.state_dict()`, not the model".into(),
        );
    };
    let is_tensor_dict =
        |items: &[(Value, Value)]| items.iter().all(|(_, v)| matches!(v, Value::Tensor { .. }));
    if !is_tensor_dict(&items) {
        for wrapper in ["state_dict", "model_state_dict", "model"] {
            if let Some((_, Value::Dict(inner))) = items
                .iter()
                .find(|(k, _)| matches!(k, Value::Str(s) if s == wrapper))
            {
                if is_tensor_dict(inner) {
                    return keyed(inner.clone());
                }
            }
        }
        let keys: Vec<String> = items
            .iter()
            .map(|(k, _)| match k {
                Value::Str(s) => s.clone(),
                other => format!("{other}"),
            })
            .collect();
        return Err(format!(
            "a dict whose entries are not all tensors (keys: {}); save `model.state_dict()`",
            keys.join(", ")
        ));
    }
    keyed(items)
}

fn keyed(items: Vec<(Value, Value)>) -> std::result::Result<Vec<(String, Value)>, String> {
    items
        .into_iter()
        .map(|(k, v)| match k {
            Value::Str(s) => Ok((s, v)),
            other => Err(format!("a state_dict key is not a string: {other}")),
        })
        .collect()
}

/// A short description of a value for messages (a hostile file must not make an error
/// message as large as the data it describes).
impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let short = |s: &str| -> String {
            let mut t: String = s.chars().take(40).collect();
            if t.len() < s.len() {
                t.push('…');
            }
            t
        };
        match self {
            Value::None => write!(f, "None"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Str(s) => write!(f, "{:?}", short(s)),
            Value::Bytes(b) => write!(f, "{} bytes", b.len()),
            Value::Tuple(v) => write!(f, "a tuple of {} items", v.len()),
            Value::List(v) => write!(f, "a list of {} items", v.len()),
            Value::Dict(v) => write!(f, "a dict of {} items", v.len()),
            Value::Global(g) => write!(f, "{}", short(g)),
            Value::StorageClass(t) => write!(f, "a {t:?} storage class"),
            Value::Storage { ty, .. } => write!(f, "a {ty:?} storage"),
            Value::Tensor { size, .. } => write!(f, "a tensor of {} dimensions", size.len()),
            Value::Mark => write!(f, "a mark"),
        }
    }
}

impl Value {
    /// Values in this one (itself and everything inside), saturating.
    fn nodes(&self) -> usize {
        match self {
            Value::Tuple(v) | Value::List(v) => {
                v.iter().fold(1usize, |n, x| n.saturating_add(x.nodes()))
            }
            Value::Dict(v) => v.iter().fold(1usize, |n, (k, x)| {
                n.saturating_add(k.nodes()).saturating_add(x.nodes())
            }),
            Value::Str(s) => 1 + s.len() / 64,
            Value::Bytes(b) => 1 + b.len() / 64,
            _ => 1,
        }
    }
}

/// The pickle stack machine (protocols 2 to 5, the opcodes `torch.save` writes).
#[derive(Default)]
struct Machine {
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    /// Values the memo may still copy: a pickle can refer to a memoised value any number
    /// of times, so copies are counted, or a few hundred bytes could build a structure of
    /// billions of values by repeated doubling.
    copies_left: usize,
}

type Step<T> = std::result::Result<T, String>;

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Step<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or("the pickle ends early: the file is truncated or corrupt")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Step<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Step<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Step<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Step<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn line(&mut self) -> Step<String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("the pickle ends early: the file is truncated or corrupt")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
    fn string(&mut self, n: usize) -> Step<String> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "a string is not UTF-8".into())
    }
}

impl Machine {
    fn pop(&mut self) -> Step<Value> {
        self.stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".into())
    }

    /// Pops everything above the topmost mark.
    fn pop_mark(&mut self) -> Step<Vec<Value>> {
        let at = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or("pickle MARK missing")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top_mut(&mut self) -> Step<&mut Value> {
        self.stack
            .last_mut()
            .ok_or_else(|| "pickle stack underflow".into())
    }

    fn global(&mut self, module: &str, name: &str) -> Step<Value> {
        let full = format!("{module}.{name}");
        if module == "torch" {
            if let Some(ty) = StorageType::from_name(name) {
                return Ok(Value::StorageClass(ty));
            }
        }
        if ALLOWED_GLOBALS.contains(&full.as_str()) {
            return Ok(Value::Global(full));
        }
        Err(format!(
            "refusing to load: the pickle calls {full}, which is not part of a tensor state_dict (only tensors and dicts are read; no code is run)"
        ))
    }

    fn reduce(&mut self, callable: Value, args: Value) -> Step<Value> {
        let Value::Global(name) = callable else {
            return Err(format!("pickle REDUCE on a non-callable {callable}"));
        };
        let Value::Tuple(args) = args else {
            return Err("pickle REDUCE without an argument tuple".into());
        };
        match name.as_str() {
            "collections.OrderedDict" => Ok(Value::Dict(Vec::new())),
            "torch.Size" => Ok(args.into_iter().next().unwrap_or(Value::Tuple(vec![]))),
            "torch._utils._rebuild_parameter" => args
                .into_iter()
                .next()
                .ok_or_else(|| "_rebuild_parameter without a tensor".into()),
            "torch._utils._rebuild_tensor_v2" => {
                let mut it = args.into_iter();
                let (storage, offset, size, stride) = (it.next(), it.next(), it.next(), it.next());
                let Some(Value::Storage { ty, key }) = storage else {
                    return Err("_rebuild_tensor_v2 without a storage".into());
                };
                let ints = |v: Option<Value>, what: &str| -> Step<Vec<usize>> {
                    match v {
                        Some(Value::Tuple(items)) => items
                            .into_iter()
                            .map(|i| match i {
                                Value::Int(n) if n >= 0 => Ok(n as usize),
                                other => Err(format!("tensor {what} holds {other}")),
                            })
                            .collect(),
                        other => Err(format!(
                            "tensor {what} is {}",
                            other.map_or("missing".into(), |v| v.to_string())
                        )),
                    }
                };
                let offset = match offset {
                    Some(Value::Int(n)) if n >= 0 => n as usize,
                    other => {
                        return Err(format!(
                            "tensor storage offset is {}",
                            other.map_or("missing".into(), |v| v.to_string())
                        ))
                    }
                };
                let size = ints(size, "size")?;
                let stride = ints(stride, "stride")?;
                if size.len() != stride.len() {
                    return Err("tensor size and stride differ in length".into());
                }
                Ok(Value::Tensor {
                    ty,
                    key,
                    offset,
                    size,
                    stride,
                })
            }
            other => Err(format!("pickle calls {other}, which cannot be rebuilt")),
        }
    }

    fn persistent_load(&mut self, pid: Value) -> Step<Value> {
        // ('storage', storage_type, key, location, numel)
        let Value::Tuple(items) = pid else {
            return Err(format!("unknown persistent id {pid}"));
        };
        match items.as_slice() {
            [Value::Str(tag), Value::StorageClass(ty), Value::Str(key), ..] if tag == "storage" => {
                Ok(Value::Storage {
                    ty: *ty,
                    key: key.clone(),
                })
            }
            _ => Err(format!("unknown persistent id ({})", Value::Tuple(items))),
        }
    }

    /// Copies a value for the memo or from it, within the copy budget.
    fn copy(&mut self, v: &Value) -> Step<Value> {
        let n = v.nodes();
        if n > self.copies_left {
            return Err(
                "the pickle copies more values than a state dict needs (a memo bomb); refusing it"
                    .into(),
            );
        }
        self.copies_left -= n;
        Ok(v.clone())
    }

    fn run(mut self, data: &[u8]) -> Step<Value> {
        // A state dict's pickle memoises each object once, mostly while it is still empty,
        // and fetches small ones (classes, globals) again: a few values per byte at most.
        self.copies_left = 4096usize.saturating_add(data.len().saturating_mul(8));
        let mut r = Reader { data, pos: 0 };
        loop {
            let op = r.u8()?;
            match op {
                0x80 => {
                    r.u8()?; // PROTO
                }
                0x95 => {
                    r.u64()?; // FRAME
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("pickle stack underflow".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items));
                }
                b'K' => {
                    let v = r.u8()? as i64;
                    self.stack.push(Value::Int(v));
                }
                b'M' => {
                    let v = r.u16()? as i64;
                    self.stack.push(Value::Int(v));
                }
                b'J' => {
                    let v = r.u32()? as i32 as i64;
                    self.stack.push(Value::Int(v));
                }
                0x8a => {
                    let n = r.u8()? as usize;
                    let b = r.take(n)?;
                    if n > 8 {
                        return Err("an integer wider than 64 bits".into());
                    }
                    let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                        [0xff; 8]
                    } else {
                        [0; 8]
                    };
                    buf[..n].copy_from_slice(b);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)));
                }
                b'G' => {
                    let v = f64::from_be_bytes(r.take(8)?.try_into().expect("8 bytes"));
                    self.stack.push(Value::Float(v));
                }
                b'X' => {
                    let n = r.u32()? as usize;
                    let s = r.string(n)?;
                    self.stack.push(Value::Str(s));
                }
                0x8c => {
                    let n = r.u8()? as usize;
                    let s = r.string(n)?;
                    self.stack.push(Value::Str(s));
                }
                0x8d => {
                    let n = r.u64()? as usize;
                    let s = r.string(n)?;
                    self.stack.push(Value::Str(s));
                }
                b'B' => {
                    let n = r.u32()? as usize;
                    let b = r.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b'C' => {
                    let n = r.u8()? as usize;
                    let b = r.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b'c' => {
                    let (module, name) = (r.line()?, r.line()?);
                    let g = self.global(&module, &name)?;
                    self.stack.push(g);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return Err("STACK_GLOBAL without module and name strings".into());
                    };
                    let g = self.global(&module, &name)?;
                    self.stack.push(g);
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.stack.push(v);
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD: object state (e.g. a state_dict's `_metadata`); not needed.
                    self.pop()?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top_mut()? {
                        Value::Dict(items) => items.push((k, v)),
                        other => return Err(format!("SETITEM on {other}")),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err("SETITEMS with an odd number of values".into());
                    }
                    let mut pairs = Vec::with_capacity(items.len() / 2);
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    match self.top_mut()? {
                        Value::Dict(d) => d.extend(pairs),
                        other => return Err(format!("SETITEMS on {other}")),
                    }
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top_mut()? {
                        Value::List(l) => l.push(v),
                        other => return Err(format!("APPEND on {other}")),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top_mut()? {
                        Value::List(l) => l.extend(items),
                        other => return Err(format!("APPENDS on {other}")),
                    }
                }
                b'q' | b'r' | 0x94 => {
                    let k = match op {
                        b'q' => r.u8()? as u32,
                        b'r' => r.u32()?,
                        _ => self.memo.len() as u32,
                    };
                    let top = self.stack.last().ok_or("pickle stack underflow")?;
                    let v = self.copy(&top.clone())?;
                    self.memo.insert(k, v);
                }
                b'h' | b'j' => {
                    let k = if op == b'h' { r.u8()? as u32 } else { r.u32()? };
                    let v = self.memo.get(&k).cloned().ok_or("pickle memo miss")?;
                    let v = self.copy(&v)?;
                    self.stack.push(v);
                }
                other => {
                    return Err(format!(
                        "unsupported pickle opcode 0x{other:02x} at byte {}",
                        r.pos - 1
                    ))
                }
            }
        }
    }
}
