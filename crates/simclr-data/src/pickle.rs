//! A small unpickler: enough of Python's pickle format (the binary protocols 2–5 and the text
//! opcodes of protocol 0, as Python 2's `cPickle` and Python 3 write them) to read data files such as CIFAR's python version, whose arrays are
//! numpy `ndarray`s.
//!
//! Nothing is executed: a global (`GLOBAL`, `STACK_GLOBAL`) stays a name, and a call (`REDUCE`,
//! `NEWOBJ`) or a `BUILD` stays a node holding its callable and arguments, for the reader of the
//! file to recognise ([`ndarray_bytes`] recognises numpy's two array forms). Memoised values are
//! copies, so a file that mutates a shared object after memoising it reads as the state at the
//! time of the copy; data files do not do that. Copies are bounded (eight times the file plus
//! 1 MiB), and so is nesting (`MAX_DEPTH`), so that no file can ask for unbounded memory or
//! overflow the stack.

use std::path::Path;

use crate::{DataError, Result};

/// A value of the pickle.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Python 3 `bytes`, or a Python 2 `str` (whose bytes are its latin-1 text).
    Bytes(Vec<u8>),
    Str(String),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// `module.name`.
    Global(String, String),
    /// A call of `callable` with `args` (`REDUCE`, or `NEWOBJ` of a class).
    Call(Box<Value>, Box<Value>),
    /// `obj` given `state` (`BUILD`).
    Build(Box<Value>, Box<Value>),
}

impl Value {
    /// The text of a `Str`, or of `Bytes` read as latin-1 (Python 2's `str`).
    pub fn text(&self) -> Option<String> {
        match self {
            Value::Str(s) => Some(s.clone()),
            Value::Bytes(b) => Some(b.iter().map(|&c| c as char).collect()),
            _ => None,
        }
    }

    /// The value of key `key` (matched as text) of a dict.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items
                .iter()
                .find(|(k, _)| k.text().as_deref() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }
}

/// A numpy array's shape, element type (`|u1`, `<i8`, …: numpy's `dtype.str` without the byte
/// order for one-byte types) and raw C-order bytes, from either of the forms numpy pickles:
/// `_reconstruct` + `BUILD` (protocols 2–4) or `_frombuffer` (protocol 5).
pub fn ndarray_bytes(v: &Value) -> Option<(Vec<usize>, String, &[u8])> {
    let ints = |v: &Value| -> Option<Vec<usize>> {
        match v {
            Value::Tuple(t) | Value::List(t) => t
                .iter()
                .map(|d| match d {
                    Value::Int(i) => usize::try_from(*i).ok(),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    };
    let dtype_name = |d: &Value| -> Option<String> {
        // numpy.dtype('u1', False, True) with a BUILD of its byte order.
        let (call, state) = match d {
            Value::Build(call, state) => (call.as_ref(), Some(state.as_ref())),
            other => (other, None),
        };
        let Value::Call(f, args) = call else {
            return None;
        };
        let Value::Global(_, name) = f.as_ref() else {
            return None;
        };
        if name != "dtype" {
            return None;
        }
        let Value::Tuple(args) = args.as_ref() else {
            return None;
        };
        let kind = args.first()?.text()?;
        let order = match state {
            Some(Value::Tuple(s)) => s.get(1).and_then(Value::text).unwrap_or_default(),
            _ => String::new(),
        };
        Some(format!("{order}{kind}"))
    };
    match v {
        // _reconstruct(ndarray, (0,), b'b') given (version, shape, dtype, fortran, data).
        Value::Build(call, state) => {
            let Value::Call(f, _) = call.as_ref() else {
                return None;
            };
            let Value::Global(_, name) = f.as_ref() else {
                return None;
            };
            if name != "_reconstruct" {
                return None;
            }
            let Value::Tuple(s) = state.as_ref() else {
                return None;
            };
            let (shape, dtype, fortran, data) = match s.as_slice() {
                [_, shape, dtype, fortran, data] => (shape, dtype, fortran, data),
                _ => return None,
            };
            if *fortran != Value::Bool(false) && *fortran != Value::Int(0) {
                return None;
            }
            let Value::Bytes(bytes) = data else {
                return None;
            };
            Some((ints(shape)?, dtype_name(dtype)?, bytes.as_slice()))
        }
        // _frombuffer(buffer, dtype, shape, order)
        Value::Call(f, args) => {
            let Value::Global(_, name) = f.as_ref() else {
                return None;
            };
            if name != "_frombuffer" {
                return None;
            }
            let Value::Tuple(a) = args.as_ref() else {
                return None;
            };
            match a.as_slice() {
                [Value::Bytes(bytes), dtype, shape, order]
                    if order.text().as_deref() == Some("C") =>
                {
                    Some((ints(shape)?, dtype_name(dtype)?, bytes.as_slice()))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| format!("truncated at byte {} (wanted {n} more)", self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn le(&mut self, n: usize) -> std::result::Result<u64, String> {
        let b = self.take(n)?;
        Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    }
    fn line(&mut self) -> std::result::Result<String, String> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| format!("unterminated line at byte {}", self.pos))?;
        let s = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.pos += end + 1;
        Ok(s)
    }
    /// A length that must fit what is left of the file (so a corrupt length cannot allocate).
    fn len(&mut self, n: usize) -> std::result::Result<usize, String> {
        let v = self.le(n)?;
        usize::try_from(v)
            .ok()
            .filter(|&v| v <= self.data.len() - self.pos)
            .ok_or_else(|| {
                format!(
                    "a length of {v} at byte {} runs past the end (truncated?)",
                    self.pos
                )
            })
    }
}

/// How deeply containers may nest: every recursive walk of a value (its copy, drop, weight)
/// stays this shallow, so a file of nested tuples cannot overflow the thread's stack.
const MAX_DEPTH: usize = 64;

/// The nesting depth of `v`, counted up to `limit` (the walk stops there).
fn bounded_depth(v: &Value, limit: usize) -> usize {
    if limit == 0 {
        return 0;
    }
    let children: Box<dyn Iterator<Item = &Value>> = match v {
        Value::List(items) | Value::Tuple(items) => Box::new(items.iter()),
        Value::Dict(items) => Box::new(items.iter().flat_map(|(k, v)| [k, v])),
        Value::Call(a, b) | Value::Build(a, b) => Box::new([a.as_ref(), b.as_ref()].into_iter()),
        _ => return 0,
    };
    1 + children
        .map(|c| bounded_depth(c, limit - 1))
        .max()
        .unwrap_or(0)
}

/// Refuses `v` when it nests deeper than [`MAX_DEPTH`].
fn shallow(v: Value, at: usize) -> std::result::Result<Value, String> {
    if bounded_depth(&v, MAX_DEPTH + 1) > MAX_DEPTH {
        return Err(format!(
            "values nest deeper than {MAX_DEPTH} levels at byte {at}"
        ));
    }
    Ok(v)
}

/// About how many bytes a copy of `v` takes.
fn weight(v: &Value) -> usize {
    16 + match v {
        Value::Bytes(b) => b.len(),
        Value::Str(s) => s.len(),
        Value::Global(m, n) => m.len() + n.len(),
        Value::List(items) | Value::Tuple(items) => items.iter().map(weight).sum(),
        Value::Dict(items) => items.iter().map(|(k, v)| weight(k) + weight(v)).sum(),
        Value::Call(a, b) | Value::Build(a, b) => weight(a) + weight(b),
        Value::None | Value::Bool(_) | Value::Int(_) | Value::Float(_) => 0,
    }
}

enum Item {
    Mark,
    Value(Value),
}

fn pop_value(stack: &mut Vec<Item>) -> std::result::Result<Value, String> {
    match stack.pop() {
        Some(Item::Value(v)) => Ok(v),
        Some(Item::Mark) => Err("a mark where a value was expected".into()),
        None => Err("stack underflow".into()),
    }
}

fn pop_mark(stack: &mut Vec<Item>) -> std::result::Result<Vec<Value>, String> {
    let at = stack
        .iter()
        .rposition(|i| matches!(i, Item::Mark))
        .ok_or("no mark on the stack")?;
    let items = stack.split_off(at + 1);
    stack.pop();
    Ok(items
        .into_iter()
        .map(|i| match i {
            Item::Value(v) => v,
            Item::Mark => Value::None,
        })
        .collect())
}

fn top_mut(stack: &mut [Item]) -> std::result::Result<&mut Value, String> {
    match stack.last_mut() {
        Some(Item::Value(v)) => Ok(v),
        _ => Err("no value on the stack".into()),
    }
}

fn add_pairs(target: &mut Value, items: Vec<Value>) -> std::result::Result<(), String> {
    let Value::Dict(d) = target else {
        return Err("SETITEM(S) on something that is not a dict".into());
    };
    if !items.len().is_multiple_of(2) {
        return Err("SETITEMS with an odd number of items".into());
    }
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        d.push((k, v));
    }
    Ok(())
}

/// The memo, whose copies (on each write and each read) are bounded in total: otherwise a small
/// file could ask for terabytes by copying one large value many times.
struct Memo {
    values: std::collections::HashMap<u64, Value>,
    copied: usize,
    budget: usize,
}

impl Memo {
    fn charge(&mut self, v: &Value, at: usize) -> std::result::Result<(), String> {
        self.copied += weight(v);
        if self.copied > self.budget {
            return Err(format!(
                "memo copies exceed {} bytes (at byte {at})",
                self.budget
            ));
        }
        Ok(())
    }

    /// Memoises the top of the stack under `key`.
    fn put(&mut self, key: u64, stack: &[Item], at: usize) -> std::result::Result<(), String> {
        let v = match stack.last() {
            Some(Item::Value(v)) => v,
            _ => return Err(format!("memoising a mark at byte {at}")),
        };
        self.charge(v, at)?;
        self.values.insert(key, v.clone());
        Ok(())
    }

    /// A copy of the value memoised under `key`.
    fn get(&mut self, key: u64, at: usize) -> std::result::Result<Value, String> {
        let v = self
            .values
            .get(&key)
            .ok_or_else(|| format!("memo entry {key} read before it is written"))?
            .clone();
        self.charge(&v, at)?;
        Ok(v)
    }
}

fn unpickle_bytes(data: &[u8]) -> std::result::Result<Value, String> {
    let mut r = Reader { data, pos: 0 };
    let mut stack: Vec<Item> = Vec::new();
    let mut memo = Memo {
        values: std::collections::HashMap::new(),
        copied: 0,
        budget: 8 * data.len() + (1 << 20),
    };
    loop {
        let at = r.pos;
        let op = r.u8()?;
        match op {
            0x80 => {
                let proto = r.u8()?;
                if proto > 5 {
                    return Err(format!("pickle protocol {proto} (at most 5 is known)"));
                }
            }
            0x95 => {
                r.take(8)?; // FRAME: a length hint
            }
            b'.' => return pop_value(&mut stack),
            b'(' => stack.push(Item::Mark),
            b'0' => {
                stack.pop().ok_or("POP on an empty stack")?;
            }
            b'1' => {
                pop_mark(&mut stack)?;
            }
            b'N' => stack.push(Item::Value(Value::None)),
            0x88 => stack.push(Item::Value(Value::Bool(true))),
            0x89 => stack.push(Item::Value(Value::Bool(false))),
            b'J' => {
                let v = r.le(4)? as u32 as i32;
                stack.push(Item::Value(Value::Int(v as i64)));
            }
            b'K' => {
                let v = r.u8()?;
                stack.push(Item::Value(Value::Int(v as i64)));
            }
            b'M' => {
                let v = r.le(2)?;
                stack.push(Item::Value(Value::Int(v as i64)));
            }
            0x8a => {
                let n = r.u8()? as usize;
                if n > 8 {
                    return Err(format!("a {n}-byte integer at byte {at}"));
                }
                let b = r.take(n)?;
                let mut v: i64 = 0;
                for (i, &x) in b.iter().enumerate() {
                    v |= (x as i64) << (8 * i);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(Item::Value(Value::Int(v)));
            }
            b'G' => {
                let b: [u8; 8] = r.take(8)?.try_into().map_err(|_| "short float")?;
                stack.push(Item::Value(Value::Float(f64::from_be_bytes(b))));
            }
            b'U' | b'C' => {
                let n = r.len(1)?;
                stack.push(Item::Value(Value::Bytes(r.take(n)?.to_vec())));
            }
            b'T' | b'B' => {
                let n = r.len(4)?;
                stack.push(Item::Value(Value::Bytes(r.take(n)?.to_vec())));
            }
            0x8e | 0x96 => {
                let n = r.len(8)?;
                stack.push(Item::Value(Value::Bytes(r.take(n)?.to_vec())));
            }
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    b'X' => r.len(4)?,
                    0x8c => r.len(1)?,
                    _ => r.len(8)?,
                };
                let s = std::str::from_utf8(r.take(n)?)
                    .map_err(|_| format!("a string that is not UTF-8 at byte {at}"))?;
                stack.push(Item::Value(Value::Str(s.to_string())));
            }
            b']' => stack.push(Item::Value(Value::List(Vec::new()))),
            b')' => stack.push(Item::Value(Value::Tuple(Vec::new()))),
            b'}' => stack.push(Item::Value(Value::Dict(Vec::new()))),
            b'l' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Item::Value(shallow(Value::List(items), at)?));
            }
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Item::Value(shallow(Value::Tuple(items), at)?));
            }
            b'd' => {
                let items = pop_mark(&mut stack)?;
                let mut d = Value::Dict(Vec::new());
                add_pairs(&mut d, items)?;
                stack.push(Item::Value(shallow(d, at)?));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(pop_value(&mut stack)?);
                }
                items.reverse();
                stack.push(Item::Value(shallow(Value::Tuple(items), at)?));
            }
            b'a' => {
                let v = shallow(pop_value(&mut stack)?, at)?;
                match top_mut(&mut stack)? {
                    Value::List(l) => l.push(v),
                    _ => return Err(format!("APPEND to a non-list at byte {at}")),
                }
            }
            b'e' => {
                let items = shallow(Value::List(pop_mark(&mut stack)?), at)?;
                let Value::List(items) = items else {
                    unreachable!("a list stays a list")
                };
                match top_mut(&mut stack)? {
                    Value::List(l) => l.extend(items),
                    _ => return Err(format!("APPENDS to a non-list at byte {at}")),
                }
            }
            b's' => {
                let v = shallow(pop_value(&mut stack)?, at)?;
                let k = shallow(pop_value(&mut stack)?, at)?;
                add_pairs(top_mut(&mut stack)?, vec![k, v])?;
            }
            b'u' => {
                let items = shallow(Value::List(pop_mark(&mut stack)?), at)?;
                let Value::List(items) = items else {
                    unreachable!("a list stays a list")
                };
                add_pairs(top_mut(&mut stack)?, items)?;
            }
            // Protocol 0 (text), as Python 2 wrote small files such as CIFAR-10's batches.meta.
            b'S' => {
                let line = r.line()?;
                let bytes = python_string_literal(&line)
                    .ok_or_else(|| format!("a malformed string {line:?} at byte {at}"))?;
                stack.push(Item::Value(Value::Bytes(bytes)));
            }
            b'V' => {
                let line = r.line()?;
                stack.push(Item::Value(Value::Str(raw_unicode_escape(&line))));
            }
            b'I' => {
                let line = r.line()?;
                let v = match line.trim() {
                    "01" => Value::Bool(true),
                    "00" => Value::Bool(false),
                    t => Value::Int(
                        t.parse()
                            .map_err(|_| format!("a malformed integer {t:?} at byte {at}"))?,
                    ),
                };
                stack.push(Item::Value(v));
            }
            b'L' => {
                let line = r.line()?;
                let t = line.trim().trim_end_matches('L');
                let v = t
                    .parse()
                    .map_err(|_| format!("a malformed or too large integer {t:?} at byte {at}"))?;
                stack.push(Item::Value(Value::Int(v)));
            }
            b'F' => {
                let line = r.line()?;
                let v = line
                    .trim()
                    .parse()
                    .map_err(|_| format!("a malformed float {line:?} at byte {at}"))?;
                stack.push(Item::Value(Value::Float(v)));
            }
            b'p' | b'g' => {
                let line = r.line()?;
                let key: u64 = line
                    .trim()
                    .parse()
                    .map_err(|_| format!("a malformed memo key {line:?} at byte {at}"))?;
                if op == b'p' {
                    memo.put(key, &stack, at)?;
                } else {
                    stack.push(Item::Value(memo.get(key, at)?));
                }
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                stack.push(Item::Value(Value::Global(module, name)));
            }
            0x93 => {
                let name = pop_value(&mut stack)?
                    .text()
                    .ok_or("STACK_GLOBAL without a name")?;
                let module = pop_value(&mut stack)?
                    .text()
                    .ok_or("STACK_GLOBAL without a module")?;
                stack.push(Item::Value(Value::Global(module, name)));
            }
            b'R' | 0x81 => {
                let args = pop_value(&mut stack)?;
                let f = pop_value(&mut stack)?;
                // Python 3 writes Python 2-compatible bytes as _codecs.encode(text, 'latin1').
                let value = match (&f, &args) {
                    (Value::Global(m, n), Value::Tuple(a)) if m == "_codecs" && n == "encode" => {
                        match a.as_slice() {
                            [Value::Str(s), enc] if enc.text().as_deref() == Some("latin1") => {
                                Value::Bytes(s.chars().map(|c| c as u32 as u8).collect())
                            }
                            _ => Value::Call(Box::new(f), Box::new(args)),
                        }
                    }
                    _ => Value::Call(Box::new(f), Box::new(args)),
                };
                stack.push(Item::Value(shallow(value, at)?));
            }
            b'b' => {
                let state = pop_value(&mut stack)?;
                let obj = pop_value(&mut stack)?;
                let built = Value::Build(Box::new(obj), Box::new(state));
                stack.push(Item::Value(shallow(built, at)?));
            }
            b'q' | b'r' | 0x94 => {
                let key = match op {
                    b'q' => r.u8()? as u64,
                    b'r' => r.le(4)?,
                    _ => memo.values.len() as u64,
                };
                memo.put(key, &stack, at)?;
            }
            b'h' | b'j' => {
                let key = if op == b'h' { r.u8()? as u64 } else { r.le(4)? };
                stack.push(Item::Value(memo.get(key, at)?));
            }
            other => {
                return Err(format!(
                    "opcode 0x{other:02x} at byte {at} is not supported"
                ))
            }
        }
    }
}

/// The bytes of a Python 2 string literal as protocol 0 writes it (`'abc'`, `"it's"`, with
/// `\\`, `\'`, `\n`, `\t`, `\r` and `\xNN` escapes); `None` when it is not one.
fn python_string_literal(line: &str) -> Option<Vec<u8>> {
    let line = line.trim_end_matches('\r');
    let quote = line.chars().next().filter(|q| *q == '\'' || *q == '"')?;
    let inner = line.strip_prefix(quote)?.strip_suffix(quote)?;
    let mut out = Vec::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next()? {
            'n' => out.push(b'\n'),
            't' => out.push(b'\t'),
            'r' => out.push(b'\r'),
            'x' => {
                let hex: String = chars.by_ref().take(2).collect();
                out.push(u8::from_str_radix(&hex, 16).ok()?);
            }
            e @ ('\\' | '\'' | '"') => out.push(e as u8),
            _ => return None,
        }
    }
    Some(out)
}

/// Protocol 0's unicode text (`V` lines: raw-unicode-escape, `\\uXXXX` for non-latin-1).
fn raw_unicode_escape(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' && chars.peek() == Some(&'u') {
            chars.next();
            let hex: String = chars.by_ref().take(4).collect();
            match u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                Some(u) => out.push(u),
                None => {
                    out.push_str("\\u");
                    out.push_str(&hex);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Reads the pickle in `data`; errors name `path`.
pub fn unpickle(path: &Path, data: &[u8]) -> Result<Value> {
    unpickle_bytes(data)
        .map_err(|why| DataError::format(path, format!("not a readable pickle: {why}")))
}
