//! Positions of every node of a YAML document, by path (`routes[0].cache.ttl`).
//! serde stops at the first error and forgets positions; this index lets semantic checks point at the exact value.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// 1-based line and column of a node in its source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

/// A YAML syntax error, positioned.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Path → position of the value (and of the key, for mapping entries).
#[derive(Debug, Default, Clone)]
pub struct SpanIndex {
    values: HashMap<String, Pos>,
    keys: HashMap<String, Pos>,
}

/// Upper bound on nodes: a document with more is refused before serde sees it (alias bombs expand in serde).
const MAX_NODES: usize = 200_000;

enum Frame {
    /// `first` until the mapping's first key is seen: block mappings' start markers sit after
    /// that key, so the first key's position stands for the mapping.
    Map {
        path: String,
        pending_key: Option<String>,
        first: bool,
    },
    Seq {
        path: String,
        next: usize,
    },
}

struct Builder {
    index: SpanIndex,
    stack: Vec<Frame>,
    nodes: usize,
    aliases: usize,
}

fn pos(m: Marker) -> Pos {
    // yaml-rust2 lines are 1-based, columns 0-based.
    Pos { line: m.line().max(1), col: m.col() + 1 }
}

fn child(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

impl Builder {
    /// Where the next node goes. Returns `None` when the node is a mapping key (recorded separately).
    fn place(&mut self, scalar_key: Option<&str>, mark: Marker) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                Some(p)
            }
            Some(Frame::Map { path, pending_key, first }) => match pending_key.take() {
                Some(k) => Some(child(path, &k)),
                None => {
                    let key = scalar_key.unwrap_or("?").to_string();
                    let full = child(path, &key);
                    if std::mem::take(first) && !self.index.keys.contains_key(path.as_str()) {
                        self.index.values.insert(path.clone(), pos(mark));
                    }
                    self.index.keys.insert(full, pos(mark));
                    *pending_key = Some(key);
                    None
                }
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        self.nodes += 1;
        match ev {
            Event::Scalar(value, ..) => {
                if let Some(p) = self.place(Some(&value), mark) {
                    self.index.values.insert(p, pos(mark));
                }
            }
            Event::Alias(_) => {
                self.aliases += 1;
                if let Some(p) = self.place(None, mark) {
                    self.index.values.insert(p, pos(mark));
                }
            }
            Event::MappingStart(..) => {
                let p = self.place(None, mark).unwrap_or_default();
                let at = self.index.keys.get(&p).copied().unwrap_or(pos(mark));
                self.index.values.insert(p.clone(), at);
                self.stack.push(Frame::Map { path: p, pending_key: None, first: true });
            }
            Event::SequenceStart(..) => {
                let p = self.place(None, mark).unwrap_or_default();
                let at = self.index.keys.get(&p).copied().unwrap_or(pos(mark));
                self.index.values.insert(p.clone(), at);
                self.stack.push(Frame::Seq { path: p, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

/// The first tab at or after `from`.
fn first_tab_from(text: &str, from: Pos) -> Option<Pos> {
    for (i, line) in text.split('\n').enumerate().skip(from.line - 1) {
        let skip = if i + 1 == from.line { from.col - 1 } else { 0 };
        if let Some(col) = line.chars().skip(skip).position(|c| c == '\t') {
            return Some(Pos { line: i + 1, col: skip + col + 1 });
        }
    }
    None
}

impl SpanIndex {
    /// Parses `text` (syntax only) and records every node's position.
    pub fn build(text: &str) -> Result<Self, SyntaxError> {
        let mut b = Builder { index: SpanIndex::default(), stack: Vec::new(), nodes: 0, aliases: 0 };
        let mut parser = Parser::new_from_str(text);
        parser.load(&mut b, false).map_err(|e| {
            let mut at = pos(*e.marker());
            let mut message = e.info().to_string();
            if message.contains("tab") {
                // The scanner reports the token before the tab (`4:11` for a tab at `5:1`):
                // point at the tab itself.
                at = first_tab_from(text, at).unwrap_or(at);
                message.push_str(" (YAML indents with spaces, never tabs)");
            }
            SyntaxError { pos: at, message }
        })?;
        if b.nodes > MAX_NODES {
            return Err(SyntaxError {
                pos: Pos { line: 1, col: 1 },
                message: format!("document too large: more than {MAX_NODES} YAML nodes"),
            });
        }
        Ok(b.index)
    }

    /// Position of the value at `path`, or of its nearest recorded ancestor.
    pub fn value(&self, path: &str) -> Pos {
        let mut p = path;
        loop {
            if let Some(pos) = self.values.get(p) {
                return *pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return self.values.get("").copied().unwrap_or(Pos { line: 1, col: 1 }),
            }
        }
    }

    /// The path of the mapping key at `pos`, if a key starts there.
    pub fn key_at(&self, pos: Pos) -> Option<&str> {
        self.keys.iter().find(|(_, p)| **p == pos).map(|(k, _)| k.as_str())
    }

    /// The first node after `path`'s key that is not inside `path` (where its entry ends, or
    /// later when it is the last of its mapping).
    pub fn next_outside(&self, path: &str) -> Option<Pos> {
        let start = self.keys.get(path)?;
        let inside = |q: &str| q == path || q.strip_prefix(path).is_some_and(|r| r.starts_with(['.', '[']));
        self.keys
            .iter()
            .chain(&self.values)
            .filter(|(q, p)| !inside(q) && (p.line, p.col) > (start.line, start.col))
            .map(|(_, p)| *p)
            .min_by_key(|p| (p.line, p.col))
    }

    /// Position of the key that introduces `path` (falls back to the value).
    pub fn key(&self, path: &str) -> Pos {
        self.keys.get(path).copied().unwrap_or_else(|| self.value(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_by_path() {
        let idx = SpanIndex::build("a: 1\nroutes:\n  - name: x\n    cache:\n      ttl: 5s\n").unwrap();
        assert_eq!(idx.value("a"), Pos { line: 1, col: 4 });
        assert_eq!(idx.value("routes[0].name"), Pos { line: 3, col: 11 });
        assert_eq!(idx.value("routes[0].cache.ttl"), Pos { line: 5, col: 12 });
        assert_eq!(idx.key("routes[0].cache.ttl"), Pos { line: 5, col: 7 });
        // a missing child falls back to its parent, a mapping positioned at its key
        assert_eq!(idx.value("routes[0].cache.nope"), Pos { line: 4, col: 5 });
        // a sequence item mapping is positioned at its first key
        assert_eq!(idx.value("routes[0]"), Pos { line: 3, col: 5 });
    }

    #[test]
    fn syntax_error_is_positioned() {
        let e = SpanIndex::build("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.pos.line >= 1);
    }
}
