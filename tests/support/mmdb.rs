//! A minimal MaxMind DB writer for tests: a binary search tree of 32-bit records, the data
//! section and the metadata, as the MaxMind DB format 2.0 specifies. Enough to build small
//! databases of every record shape Meridian reads.

use std::net::IpAddr;

use ipnet::IpNet;

/// A value of the data section.
#[derive(Debug, Clone)]
pub enum Value {
    Str(String),
    Double(f64),
    Float(f32),
    U16(u16),
    U32(u32),
    U64(u64),
    Bool(bool),
    Map(Vec<(String, Value)>),
    Array(Vec<Value>),
}

/// `Value::Map` from pairs, for terse record literals.
pub fn map(pairs: &[(&str, Value)]) -> Value {
    Value::Map(pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect())
}

pub fn s(text: &str) -> Value {
    Value::Str(text.to_string())
}

#[derive(Clone, Copy)]
enum Child {
    Empty,
    Node(usize),
    Data(usize),
}

/// Collects networks with their records, then writes the database.
pub struct Writer {
    ip_version: u16,
    database_type: String,
    build_epoch: u64,
    nodes: Vec<[Child; 2]>,
    records: Vec<Value>,
}

impl Writer {
    /// `ip_version` 4 builds a 32-bit tree (IPv4 only), 6 a 128-bit one where IPv4
    /// networks sit under `::/96`, as MaxMind's own files do.
    pub fn new(ip_version: u16, database_type: &str, build_epoch: u64) -> Writer {
        Writer {
            ip_version,
            database_type: database_type.to_string(),
            build_epoch,
            nodes: vec![[Child::Empty, Child::Empty]],
            records: Vec::new(),
        }
    }

    /// Adds `network` (e.g. "13.56.0.0/16") with `record`. Networks must not nest.
    pub fn insert(&mut self, network: &str, record: Value) -> &mut Writer {
        let net: IpNet = network.parse().unwrap_or_else(|e| panic!("{network}: {e}"));
        let (bits, len): (Vec<bool>, usize) = match (net.addr(), self.ip_version) {
            (IpAddr::V4(a), 4) => (bits_of(&a.octets()), usize::from(net.prefix_len())),
            (IpAddr::V4(a), _) => (
                bits_of(&a.to_ipv6_compatible().octets()),
                96 + usize::from(net.prefix_len()),
            ),
            (IpAddr::V6(a), 6) => (bits_of(&a.octets()), usize::from(net.prefix_len())),
            (IpAddr::V6(_), _) => panic!("{network}: IPv6 network in an IPv4 database"),
        };
        self.records.push(record);
        let data = self.records.len() - 1;
        let mut node = 0;
        for (depth, &bit) in bits.iter().take(len).enumerate() {
            let side = usize::from(bit);
            if depth + 1 == len {
                self.nodes[node][side] = Child::Data(data);
                break;
            }
            node = match self.nodes[node][side] {
                Child::Node(n) => n,
                Child::Empty => {
                    self.nodes.push([Child::Empty, Child::Empty]);
                    let n = self.nodes.len() - 1;
                    self.nodes[node][side] = Child::Node(n);
                    n
                }
                Child::Data(_) => panic!("{network} is inside a network already inserted"),
            };
        }
        self
    }

    /// The database file's bytes.
    pub fn build(&self) -> Vec<u8> {
        let mut data = Vec::new();
        let offsets: Vec<usize> = self
            .records
            .iter()
            .map(|r| {
                let at = data.len();
                encode(r, &mut data);
                at
            })
            .collect();
        let node_count = self.nodes.len();
        let mut out = Vec::new();
        for node in &self.nodes {
            for child in node {
                let value = match *child {
                    Child::Empty => node_count,
                    Child::Node(n) => n,
                    Child::Data(d) => node_count + 16 + offsets[d],
                };
                out.extend_from_slice(&(value as u32).to_be_bytes());
            }
        }
        out.extend_from_slice(&[0u8; 16]);
        out.extend_from_slice(&data);
        out.extend_from_slice(b"\xab\xcd\xefMaxMind.com");
        let metadata = map(&[
            ("binary_format_major_version", Value::U16(2)),
            ("binary_format_minor_version", Value::U16(0)),
            ("build_epoch", Value::U64(self.build_epoch)),
            ("database_type", s(&self.database_type)),
            ("description", map(&[("en", s("Meridian test database"))])),
            ("ip_version", Value::U16(self.ip_version)),
            ("languages", Value::Array(vec![s("en")])),
            ("node_count", Value::U32(node_count as u32)),
            ("record_size", Value::U16(32)),
        ]);
        encode(&metadata, &mut out);
        out
    }

    /// Writes the database to `path`.
    pub fn write(&self, path: &std::path::Path) {
        std::fs::write(path, self.build()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

fn bits_of(bytes: &[u8]) -> Vec<bool> {
    bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1 == 1))
        .collect()
}

/// Control byte(s) for a value of `kind` (the format's type number) and `size`.
fn control(kind: u8, size: usize, out: &mut Vec<u8>) {
    let (size_bits, extra): (u8, Vec<u8>) = match size {
        0..=28 => (size as u8, vec![]),
        29..=284 => (29, vec![(size - 29) as u8]),
        285..=65_820 => (30, ((size - 285) as u16).to_be_bytes().to_vec()),
        _ => (31, ((size - 65_821) as u32).to_be_bytes()[1..].to_vec()),
    };
    if kind <= 7 {
        out.push((kind << 5) | size_bits);
    } else {
        out.push(size_bits);
        out.push(kind - 7);
    }
    out.extend_from_slice(&extra);
}

fn uint(kind: u8, value: u64, out: &mut Vec<u8>) {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|&&b| b == 0).count();
    control(kind, 8 - skip, out);
    out.extend_from_slice(&bytes[skip..]);
}

fn encode(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Str(t) => {
            control(2, t.len(), out);
            out.extend_from_slice(t.as_bytes());
        }
        Value::Double(d) => {
            control(3, 8, out);
            out.extend_from_slice(&d.to_be_bytes());
        }
        Value::Float(f) => {
            control(15, 4, out);
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::U16(v) => uint(5, u64::from(*v), out),
        Value::U32(v) => uint(6, u64::from(*v), out),
        Value::U64(v) => uint(9, *v, out),
        Value::Bool(b) => control(14, usize::from(*b), out),
        Value::Map(pairs) => {
            control(7, pairs.len(), out);
            for (k, v) in pairs {
                encode(&Value::Str(k.clone()), out);
                encode(v, out);
            }
        }
        Value::Array(items) => {
            control(11, items.len(), out);
            for v in items {
                encode(v, out);
            }
        }
    }
}
