//! Captions, prompts and their vocabulary.
//!
//! Grammar (all lower case, no punctuation):
//!
//! ```text
//! caption    := object ( " and " object )* " on " background
//! object     := article [size " "] colour " " shape [" " where]
//! article    := "a" | "an"            ("an" before a vowel: "an orange star")
//! size       := "small" | "medium" | "large"   (by default "medium" is left out)
//! where      := "at the top left" | "at the top" | "at the top right"
//!             | "on the left" | "in the centre" | "on the right"
//!             | "at the bottom left" | "at the bottom" | "at the bottom right"
//! background := "a " C " background"                        (solid)
//!             | "a " C " and " C " gradient background"     (from, to)
//!             | "a striped " C " and " C " background"
//!             | "a checked " C " and " C " background"
//! ```
//!
//! Objects are listed back to front (drawing order). Generated captions always have a
//! position; prompts for [`parse_prompt`] may leave out the position and the
//! background.

use serde::{Deserialize, Serialize};

use crate::geometry::Shape;
use crate::palette::Colour;
use crate::scene::{Background, BgKind, ObjectInfo, Position, Size};

/// When to write an object's size word.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SizeWords {
    Always,
    /// "small" and "large" only; a medium object has no size word.
    #[default]
    NotMedium,
    Never,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptionStyle {
    pub sizes: SizeWords,
}

/// One object of a prompt (what the judge should find).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ObjectQuery {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Option<Size>,
    pub position: Option<Position>,
}

impl ObjectQuery {
    pub fn new(shape: Shape, colour: Colour) -> Self {
        ObjectQuery { shape, colour, size: None, position: None }
    }

    pub fn at(mut self, p: Position) -> Self {
        self.position = Some(p);
        self
    }

    pub fn sized(mut self, s: Size) -> Self {
        self.size = Some(s);
        self
    }

    pub fn from_info(o: &ObjectInfo) -> Self {
        ObjectQuery { shape: o.shape, colour: o.colour, size: Some(o.size), position: Some(o.position) }
    }

    /// "a small yellow star at the top left".
    pub fn phrase(&self, style: &CaptionStyle) -> String {
        let mut words: Vec<&str> = Vec::new();
        match (self.size, style.sizes) {
            (Some(s), SizeWords::Always) => words.push(s.name()),
            (Some(s), SizeWords::NotMedium) if s != Size::Medium => words.push(s.name()),
            _ => {}
        }
        words.push(self.colour.name());
        words.push(self.shape.name());
        if let Some(p) = self.position {
            words.push(p.phrase());
        }
        let rest = words.join(" ");
        format!("{} {}", article_for(&rest), rest)
    }
}

/// The background part of a parsed prompt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackgroundQuery {
    pub kind: BgKind,
    pub colours: Vec<Colour>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParsedPrompt {
    pub objects: Vec<ObjectQuery>,
    pub background: Option<BackgroundQuery>,
}

fn article_for(next: &str) -> &'static str {
    if matches!(next.as_bytes().first(), Some(b'a' | b'e' | b'i' | b'o' | b'u')) {
        "an"
    } else {
        "a"
    }
}

/// "a white background", "a striped white and grey background", …
pub fn background_phrase(bg: &Background) -> String {
    match bg {
        Background::Solid { colour } => {
            format!("{} {} background", article_for(colour.name()), colour)
        }
        Background::Gradient { from, to, .. } => {
            format!("{} {from} and {to} gradient background", article_for(from.name()))
        }
        Background::Stripes { colours: [a, b], .. } => format!("a striped {a} and {b} background"),
        Background::Checks { colours: [a, b], .. } => format!("a checked {a} and {b} background"),
    }
}

/// The caption of a scene.
pub fn caption(objects: &[ObjectInfo], background: &Background, style: &CaptionStyle) -> String {
    let objs: Vec<String> = objects.iter().map(|o| ObjectQuery::from_info(o).phrase(style)).collect();
    format!("{} on {}", objs.join(" and "), background_phrase(background))
}

/// Every word a caption or prompt can use (for training a tokenizer), sorted.
pub fn vocabulary() -> Vec<&'static str> {
    let mut words: Vec<&'static str> =
        vec!["a", "an", "and", "on", "at", "in", "the", "background", "gradient", "striped", "checked"];
    words.extend(Size::ALL.iter().map(|s| s.name()));
    words.extend(Shape::ALL.iter().map(|s| s.name()));
    for c in Colour::ALL {
        words.extend(c.name().split(' '));
    }
    for p in Position::ALL {
        words.extend(p.phrase().split(' '));
    }
    words.sort_unstable();
    words.dedup();
    words
}

fn position_from_phrase(s: &str) -> Option<Position> {
    let s = s.replace("center", "centre");
    if let Some(p) = Position::ALL.iter().copied().find(|p| p.phrase() == s) {
        return Some(p);
    }
    // A few forgiving variants: "at the left", "on the top right", "in the middle", "at the centre".
    let core = s.trim_start_matches("at the ").trim_start_matches("on the ").trim_start_matches("in the ");
    let core = if core == "middle" { "centre" } else { core };
    Position::from_name(core)
}

fn parse_object(s: &str) -> Result<ObjectQuery, String> {
    let words: Vec<&str> = s.split(' ').collect();
    let mut i = 0;
    if matches!(words.first(), Some(&"a" | &"an" | &"one" | &"the")) {
        i += 1;
    }
    let mut size = None;
    if let Some(z) = words.get(i).and_then(|w| Size::from_name(w)) {
        size = Some(z);
        i += 1;
    }
    let colour = words
        .get(i)
        .and_then(|w| Colour::from_name(w))
        .ok_or_else(|| format!("expected a colour at {:?} in {s:?}", words.get(i)))?;
    i += 1;
    let shape = words
        .get(i)
        .and_then(|w| Shape::from_name(w))
        .ok_or_else(|| format!("expected a shape at {:?} in {s:?}", words.get(i)))?;
    i += 1;
    let rest = words[i..].join(" ");
    let position = if rest.is_empty() {
        None
    } else {
        Some(position_from_phrase(&rest).ok_or_else(|| format!("unknown position {rest:?}"))?)
    };
    Ok(ObjectQuery { shape, colour, size, position })
}

fn parse_background(s: &str) -> Result<BackgroundQuery, String> {
    let s = s.trim_start_matches("an ").trim_start_matches("a ");
    let s = s.strip_suffix(" background").ok_or_else(|| format!("background {s:?} must end in 'background'"))?;
    let (kind, body) = if let Some(b) = s.strip_prefix("striped ") {
        (BgKind::Stripes, b)
    } else if let Some(b) = s.strip_prefix("checked ") {
        (BgKind::Checks, b)
    } else if let Some(b) = s.strip_suffix(" gradient") {
        (BgKind::Gradient, b)
    } else {
        (BgKind::Solid, s)
    };
    let names: Vec<&str> = body.split(" and ").collect();
    let colours = names
        .iter()
        .map(|n| Colour::from_name(n).ok_or_else(|| format!("unknown colour {n:?}")))
        .collect::<Result<Vec<_>, _>>()?;
    let want = if kind == BgKind::Solid { 1 } else { 2 };
    if colours.len() != want {
        return Err(format!("{kind} background needs {want} colour(s), got {body:?}"));
    }
    Ok(BackgroundQuery { kind, colours })
}

/// Parse a caption or prompt of the grammar above ("a red circle on the right",
/// "a small blue ring and a green star at the top on a black background").
pub fn parse_prompt(prompt: &str) -> Result<ParsedPrompt, String> {
    let norm = prompt.trim().trim_end_matches('.').to_lowercase().split_whitespace().collect::<Vec<_>>().join(" ");
    let (objs, bg) = match norm.rfind(" on a ").or_else(|| norm.rfind(" on an ")) {
        Some(k) => (&norm[..k], Some(parse_background(&norm[k + 4..])?)),
        None => (norm.as_str(), None),
    };
    let mut parts: Vec<String> = Vec::new();
    let mut rest = objs;
    loop {
        let cut = [" and a ", " and an "].iter().filter_map(|sep| rest.find(sep).map(|k| (k, 5))).min();
        match cut {
            Some((k, skip)) => {
                parts.push(rest[..k].to_string());
                rest = &rest[k + skip..];
            }
            None => {
                parts.push(rest.to_string());
                break;
            }
        }
    }
    let objects = parts.iter().map(|p| parse_object(p)).collect::<Result<Vec<_>, _>>()?;
    Ok(ParsedPrompt { objects, background: bg })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phrases() {
        let st = CaptionStyle::default();
        let q = ObjectQuery::new(Shape::Star, Colour::Yellow).sized(Size::Small).at(Position::TopLeft);
        assert_eq!(q.phrase(&st), "a small yellow star at the top left");
        let q = ObjectQuery::new(Shape::Circle, Colour::Orange).sized(Size::Medium).at(Position::Right);
        assert_eq!(q.phrase(&st), "an orange circle on the right");
        assert_eq!(q.phrase(&CaptionStyle { sizes: SizeWords::Always }), "a medium orange circle on the right");
    }

    #[test]
    fn parse_examples() {
        let p = parse_prompt("A red circle on the right.").unwrap();
        assert_eq!(p.objects, vec![ObjectQuery::new(Shape::Circle, Colour::Red).at(Position::Right)]);
        assert_eq!(p.background, None);
        let p = parse_prompt(
            "a red circle on the left and a large green square at the bottom right on a striped white and grey background",
        )
        .unwrap();
        assert_eq!(p.objects.len(), 2);
        assert_eq!(
            p.objects[1],
            ObjectQuery::new(Shape::Square, Colour::Green).sized(Size::Large).at(Position::BottomRight)
        );
        assert_eq!(
            p.background,
            Some(BackgroundQuery { kind: BgKind::Stripes, colours: vec![Colour::White, Colour::Grey] })
        );
        let p = parse_prompt("an orange ring in the center on a dark blue and black gradient background").unwrap();
        assert_eq!(p.objects[0].position, Some(Position::Centre));
        assert_eq!(p.background.unwrap().colours, vec![Colour::DarkBlue, Colour::Black]);
        assert!(parse_prompt("a red banana").is_err());
    }

    #[test]
    fn vocabulary_is_small() {
        let v = vocabulary();
        assert!(v.len() < 60, "{v:?}");
        assert!(v.contains(&"centre") && v.contains(&"dark") && v.contains(&"ring"));
    }
}
