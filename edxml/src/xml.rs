//! Safe XML reading into a small element tree, and escaping for the writers.
//!
//! Invariants:
//! - Input larger than [`Limits::max_package_bytes`] is refused before any parsing.
//! - A document type declaration is refused outright ([`EdxmlError::DtdRefused`]), so no
//!   entity can be defined; references other than the five predefined entities and
//!   character references are refused ([`EdxmlError::EntityRefused`]). Nothing is ever
//!   fetched or expanded: no XXE, no "billion laughs".
//! - Nesting depth and element count are bounded ([`Limits`]).
//! - Only UTF-8 input is accepted (an XML declaration naming another encoding is refused,
//!   and so is UTF-16 with or without a byte order mark); a UTF-8 byte order mark is
//!   skipped.
//! - Element names are resolved against namespaces: an element counts as edXML when it is
//!   in `http://www.mic.gov.vn/TBT/QCVN_102_2016` under any prefix, or in no namespace at
//!   all (some senders omit the declaration). Elements of other namespaces (e.g. an XML
//!   signature) are kept in the tree but never matched by name.
//! - Text is decoded with XML end-of-line normalisation; leading and trailing whitespace
//!   is trimmed by the readers of single values ([`Element::value`]).

use std::borrow::Cow;

use quick_xml::NsReader;
use quick_xml::events::Event;
use quick_xml::name::ResolveResult;

use crate::Limits;
use crate::error::EdxmlError;

/// The edXML namespace of QCVN 102:2016/BTTTT.
pub const EDXML_NS: &str = "http://www.mic.gov.vn/TBT/QCVN_102_2016";

/// One element: its local name, whether it counts as edXML, attributes by local name,
/// its own text and its child elements.
#[derive(Debug, Default)]
pub(crate) struct Element {
    pub name: String,
    pub edxml: bool,
    pub attributes: Vec<(String, String)>,
    pub text: String,
    pub children: Vec<Element>,
}

impl Element {
    /// Child edXML elements with this local name.
    pub fn all<'a, 'n>(&'a self, name: &'n str) -> impl Iterator<Item = &'a Element> + use<'a, 'n> {
        self.children
            .iter()
            .filter(move |c| c.edxml && c.name == name)
    }

    /// The one child with this name, if any; `path` names it in the error when there are
    /// several.
    pub fn one(&self, name: &str, path: &str) -> Result<Option<&Element>, EdxmlError> {
        let mut found = self.all(name);
        let first = found.next();
        if found.next().is_some() {
            return Err(EdxmlError::DuplicateElement { path: path.into() });
        }
        Ok(first)
    }

    /// The one child with this name; missing is an error.
    pub fn required(&self, name: &str, path: &str) -> Result<&Element, EdxmlError> {
        self.one(name, path)?
            .ok_or_else(|| EdxmlError::MissingElement { path: path.into() })
    }

    /// The trimmed text of the one child with this name, if present.
    pub fn value(&self, name: &str, path: &str) -> Result<Option<String>, EdxmlError> {
        Ok(self.one(name, path)?.map(|e| e.text.trim().to_owned()))
    }

    /// The trimmed text of the one child with this name, empty when absent.
    pub fn value_or_empty(&self, name: &str, path: &str) -> Result<String, EdxmlError> {
        Ok(self.value(name, path)?.unwrap_or_default())
    }

    /// The trimmed text of the one child with this name, `None` when absent or empty.
    pub fn value_non_empty(&self, name: &str, path: &str) -> Result<Option<String>, EdxmlError> {
        Ok(self.value(name, path)?.filter(|v| !v.is_empty()))
    }

    /// An attribute by local name (any prefix).
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn position(xml: &[u8], offset: u64) -> (usize, usize) {
    let offset = usize::try_from(offset).unwrap_or(usize::MAX).min(xml.len());
    let before = &xml[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    (line, offset - line_start + 1)
}

fn syntax(xml: &[u8], offset: u64, detail: impl std::fmt::Display) -> EdxmlError {
    let (line, column) = position(xml, offset);
    let detail = detail.to_string();
    EdxmlError::XmlSyntax {
        line,
        column,
        detail: detail.chars().take(200).collect(),
    }
}

fn utf8<'a>(
    xml: &[u8],
    offset: u64,
    text: Result<Cow<'a, str>, quick_xml::encoding::EncodingError>,
) -> Result<Cow<'a, str>, EdxmlError> {
    text.map_err(|e| syntax(xml, offset, format!("not UTF-8: {e}")))
}

/// Parses `xml` into an element tree under the rules in the module documentation.
pub(crate) fn parse_tree(xml: &[u8], limits: &Limits) -> Result<Element, EdxmlError> {
    if xml.len() > limits.max_package_bytes {
        return Err(EdxmlError::TooLarge {
            what: "package",
            limit: limits.max_package_bytes,
        });
    }
    // .NET serialisers write UTF-16 when they write to a string: say so plainly rather
    // than report the first byte that is not UTF-8.
    if xml.starts_with(&[0xFF, 0xFE])
        || xml.starts_with(&[0xFE, 0xFF])
        || xml.starts_with(b"<\0")
        || xml.starts_with(b"\0<")
    {
        return Err(syntax(
            xml,
            0,
            "only UTF-8 is supported and this package is UTF-16: save it as UTF-8",
        ));
    }
    let mut reader = NsReader::from_reader(xml);
    {
        let config = reader.config_mut();
        config.expand_empty_elements = true;
        config.check_end_names = true;
        config.trim_text(false);
    }
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    let mut elements = 0usize;
    loop {
        let offset = reader.buffer_position();
        let (resolved, event) = match reader.read_resolved_event() {
            Ok((resolved, event)) => {
                let edxml = match resolved {
                    ResolveResult::Bound(ns) => Some(ns.as_ref() == EDXML_NS.as_bytes()),
                    ResolveResult::Unbound => Some(true),
                    ResolveResult::Unknown(_) => None,
                };
                (edxml, event)
            }
            Err(e) => return Err(syntax(xml, reader.error_position(), e)),
        };
        match event {
            Event::Start(start) => {
                if root.is_some() {
                    return Err(syntax(xml, offset, "content after the root element"));
                }
                let Some(edxml) = resolved else {
                    return Err(syntax(xml, offset, "undeclared namespace prefix"));
                };
                elements += 1;
                if elements > limits.max_elements {
                    return Err(EdxmlError::TooMany {
                        what: "elements",
                        limit: limits.max_elements,
                    });
                }
                if stack.len() >= limits.max_depth {
                    return Err(EdxmlError::TooMany {
                        what: "nesting levels",
                        limit: limits.max_depth,
                    });
                }
                let name = utf8(
                    xml,
                    offset,
                    std::str::from_utf8(start.local_name().into_inner())
                        .map(Cow::Borrowed)
                        .map_err(quick_xml::encoding::EncodingError::Utf8),
                )?
                .into_owned();
                let mut attributes = Vec::new();
                for attribute in start.attributes() {
                    let attribute = attribute.map_err(|e| syntax(xml, offset, e))?;
                    let key = attribute.key;
                    if key.as_namespace_binding().is_some() {
                        continue;
                    }
                    let local = String::from_utf8_lossy(key.local_name().into_inner()).into_owned();
                    let value = attribute.unescape_value().map_err(|e| match e {
                        quick_xml::Error::Escape(
                            quick_xml::escape::EscapeError::UnrecognizedEntity(_, name),
                        ) => EdxmlError::EntityRefused {
                            name: crate::error::shorten(&name),
                        },
                        other => syntax(xml, offset, other),
                    })?;
                    attributes.push((local, value.into_owned()));
                }
                stack.push(Element {
                    name,
                    edxml,
                    attributes,
                    text: String::new(),
                    children: Vec::new(),
                });
            }
            Event::End(_) => {
                let Some(done) = stack.pop() else {
                    return Err(syntax(xml, offset, "end tag without a start tag"));
                };
                match stack.last_mut() {
                    Some(parent) => parent.children.push(done),
                    None => root = Some(done),
                }
            }
            Event::Empty(_) => {
                // `expand_empty_elements` turns these into Start + End.
                return Err(syntax(xml, offset, "unexpected empty element event"));
            }
            Event::Text(text) => {
                let text = utf8(xml, offset, text.xml_content())?;
                match stack.last_mut() {
                    Some(top) => top.text.push_str(&text),
                    None if text.trim().is_empty() => {}
                    None => return Err(syntax(xml, offset, "text outside the root element")),
                }
            }
            Event::CData(data) => {
                let text = utf8(xml, offset, data.xml_content())?;
                match stack.last_mut() {
                    Some(top) => top.text.push_str(&text),
                    None => return Err(syntax(xml, offset, "CDATA outside the root element")),
                }
            }
            Event::GeneralRef(reference) => {
                let ch = match reference.resolve_char_ref() {
                    Ok(Some(ch)) => ch,
                    Ok(None) => {
                        let name = utf8(xml, offset, reference.decode())?;
                        match &*name {
                            "lt" => '<',
                            "gt" => '>',
                            "amp" => '&',
                            "apos" => '\'',
                            "quot" => '"',
                            other => {
                                return Err(EdxmlError::EntityRefused {
                                    name: crate::error::shorten(other),
                                });
                            }
                        }
                    }
                    Err(e) => return Err(syntax(xml, offset, e)),
                };
                match stack.last_mut() {
                    Some(top) => top.text.push(ch),
                    None => return Err(syntax(xml, offset, "reference outside the root element")),
                }
            }
            Event::Decl(decl) => {
                if let Some(encoding) = decl.encoding() {
                    let encoding = encoding.map_err(|e| syntax(xml, offset, e))?;
                    if !encoding.eq_ignore_ascii_case(b"utf-8") {
                        return Err(syntax(
                            xml,
                            offset,
                            format!(
                                "only UTF-8 is supported, the declaration says {}",
                                crate::error::shorten(&String::from_utf8_lossy(&encoding))
                            ),
                        ));
                    }
                }
            }
            Event::DocType(_) => return Err(EdxmlError::DtdRefused),
            Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(syntax(
            xml,
            xml.len() as u64,
            "unexpected end of input: an element is not closed",
        ));
    }
    root.ok_or_else(|| syntax(xml, 0, "no root element"))
}

/// Escapes text for element content or a double-quoted attribute value. Carriage returns
/// and tabs are written as character references so that they survive end-of-line and
/// attribute-value normalisation.
pub(crate) fn escape(text: &str) -> Cow<'_, str> {
    if !text
        .chars()
        .any(|c| matches!(c, '&' | '<' | '>' | '"' | '\'' | '\r' | '\t'))
    {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\r' => out.push_str("&#13;"),
            '\t' => out.push_str("&#9;"),
            other => out.push(other),
        }
    }
    Cow::Owned(out)
}

/// A small indenting writer for edXML output: every element inside the envelope is
/// written with the `edXML:` prefix.
pub(crate) struct Writer {
    out: String,
    depth: usize,
}

impl Writer {
    pub fn new() -> Self {
        Self {
            out: String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"),
            depth: 0,
        }
    }

    fn indent(&mut self) {
        for _ in 0..self.depth {
            self.out.push_str("  ");
        }
    }

    /// Opens `<name attrs...>`; `name` is written as given (with its prefix).
    pub fn open(&mut self, name: &str, attributes: &[(&str, &str)]) {
        self.indent();
        self.out.push('<');
        self.out.push_str(name);
        for (key, value) in attributes {
            self.out.push(' ');
            self.out.push_str(key);
            self.out.push_str("=\"");
            self.out.push_str(&escape(value));
            self.out.push('"');
        }
        self.out.push_str(">\n");
        self.depth += 1;
    }

    pub fn close(&mut self, name: &str) {
        self.depth = self.depth.saturating_sub(1);
        self.indent();
        self.out.push_str("</");
        self.out.push_str(name);
        self.out.push_str(">\n");
    }

    /// `<name>text</name>`, always written (empty text gives an empty element).
    pub fn leaf(&mut self, name: &str, text: &str) {
        self.indent();
        self.out.push('<');
        self.out.push_str(name);
        self.out.push('>');
        self.out.push_str(&escape(text));
        self.out.push_str("</");
        self.out.push_str(name);
        self.out.push_str(">\n");
    }

    /// Writes the leaf only when there is a value.
    pub fn leaf_opt(&mut self, name: &str, text: Option<&str>) {
        if let Some(text) = text {
            self.leaf(name, text);
        }
    }

    pub fn finish(self) -> Vec<u8> {
        self.out.into_bytes()
    }
}
