//! The scene generator.

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::caption::{self, CaptionStyle};
use crate::geometry::{raster, Shape};
use crate::mask::Mask;
use crate::palette::{lerp_rgb, Colour, GRADIENT_PAIRS};
use crate::rng::Rng;

// ---------------------------------------------------------------------------------
// Attributes
// ---------------------------------------------------------------------------------

/// Size class of an object, by its extent (the larger side of its bounding box)
/// as a fraction of the image side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Size {
    Small,
    Medium,
    Large,
}

crate::named_enum!(Size { Small => "small", Medium => "medium", Large => "large" });

impl Size {
    /// Range of extents the generator draws from (fraction of the image side).
    pub fn extent_range(self) -> (f64, f64) {
        match self {
            Size::Small => (0.21, 0.23),
            Size::Medium => (0.285, 0.315),
            Size::Large => (0.38, 0.42),
        }
    }

    /// The class whose range is nearest (geometric midpoints 0.257 and 0.346).
    pub fn classify(extent_fraction: f64) -> Size {
        if extent_fraction < 0.257 {
            Size::Small
        } else if extent_fraction < 0.346 {
            Size::Medium
        } else {
            Size::Large
        }
    }
}

/// Where an object is: the cell of a 3×3 grid that holds its centroid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Position {
    TopLeft,
    Top,
    TopRight,
    Left,
    Centre,
    Right,
    BottomLeft,
    Bottom,
    BottomRight,
}

crate::named_enum!(Position {
    TopLeft => "top left",
    Top => "top",
    TopRight => "top right",
    Left => "left",
    Centre => "centre",
    Right => "right",
    BottomLeft => "bottom left",
    Bottom => "bottom",
    BottomRight => "bottom right",
});

impl Position {
    /// Column 0 (left), 1 (middle), 2 (right).
    pub fn col(self) -> u32 {
        (self as u32) % 3
    }

    /// Row 0 (top), 1 (middle), 2 (bottom).
    pub fn row(self) -> u32 {
        (self as u32) / 3
    }

    pub fn from_cell(col: u32, row: u32) -> Position {
        Position::ALL[(row.min(2) * 3 + col.min(2)) as usize]
    }

    /// The cell holding point `(x, y)` of a `width`×`height` image.
    pub fn of_point(x: f64, y: f64, width: u32, height: u32) -> Position {
        let col = ((x * 3.0 / width as f64).floor().max(0.0) as u32).min(2);
        let row = ((y * 3.0 / height as f64).floor().max(0.0) as u32).min(2);
        Position::from_cell(col, row)
    }

    /// The phrase used in captions: "at the top left", "on the left", "in the centre"…
    pub fn phrase(self) -> &'static str {
        match self {
            Position::TopLeft => "at the top left",
            Position::Top => "at the top",
            Position::TopRight => "at the top right",
            Position::Left => "on the left",
            Position::Centre => "in the centre",
            Position::Right => "on the right",
            Position::BottomLeft => "at the bottom left",
            Position::Bottom => "at the bottom",
            Position::BottomRight => "at the bottom right",
        }
    }
}

/// Kind of background.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BgKind {
    Solid,
    Gradient,
    Stripes,
    Checks,
}

crate::named_enum!(BgKind { Solid => "solid", Gradient => "gradient", Stripes => "stripes", Checks => "checks" });

/// Orientation of a gradient or of stripes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Horizontal,
    Vertical,
}

crate::named_enum!(Direction { Horizontal => "horizontal", Vertical => "vertical" });

/// A background, exactly (everything needed to redraw it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Background {
    Solid {
        colour: Colour,
    },
    /// `Horizontal`: `from` at the left edge to `to` at the right edge; `Vertical`: top to bottom.
    Gradient {
        from: Colour,
        to: Colour,
        direction: Direction,
    },
    /// `Horizontal`: horizontal bands (the colour changes going down). Band `k` (counting
    /// from `-offset`) has colour `colours[k % 2]`; bands are `width` pixels.
    Stripes {
        colours: [Colour; 2],
        direction: Direction,
        width: u32,
        offset: u32,
    },
    /// Square cells of `cell` pixels, shifted by the offsets; cell (i, j) has colour
    /// `colours[(i + j) % 2]`.
    Checks {
        colours: [Colour; 2],
        cell: u32,
        offset_x: u32,
        offset_y: u32,
    },
}

impl Background {
    pub fn kind(&self) -> BgKind {
        match self {
            Background::Solid { .. } => BgKind::Solid,
            Background::Gradient { .. } => BgKind::Gradient,
            Background::Stripes { .. } => BgKind::Stripes,
            Background::Checks { .. } => BgKind::Checks,
        }
    }

    /// The named colours it is made of (1 or 2), in caption order.
    pub fn colours(&self) -> Vec<Colour> {
        match *self {
            Background::Solid { colour } => vec![colour],
            Background::Gradient { from, to, .. } => vec![from, to],
            Background::Stripes { colours, .. } | Background::Checks { colours, .. } => colours.to_vec(),
        }
    }

    /// Colour of pixel `(x, y)` in a `size`×`size` image.
    pub fn pixel(&self, x: u32, y: u32, size: u32) -> [u8; 3] {
        match *self {
            Background::Solid { colour } => colour.rgb(),
            Background::Gradient { from, to, direction } => {
                let t = if direction == Direction::Horizontal { x } else { y };
                lerp_rgb(from.rgb(), to.rgb(), t, size.max(2) - 1)
            }
            Background::Stripes { colours, direction, width, offset } => {
                let t = if direction == Direction::Horizontal { y } else { x };
                colours[(((t + offset) / width.max(1)) % 2) as usize].rgb()
            }
            Background::Checks { colours, cell, offset_x, offset_y } => {
                let c = cell.max(1);
                colours[(((x + offset_x) / c + (y + offset_y) / c) % 2) as usize].rgb()
            }
        }
    }
}

/// An object's box in continuous image coordinates (pixel `(x, y)` covers
/// `[x, x+1) × [y, y+1)`; a pixel belongs to the shape when its centre is inside).
/// Generated placements are multiples of 1/256 pixel.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub x0: f64,
    pub y0: f64,
    pub w: f64,
    pub h: f64,
}

// ---------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------

/// One object of a generated scene (serde: the ground truth metadata).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ObjectInfo {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Size,
    /// Grid cell of the centroid of its visible pixels.
    pub position: Position,
    /// The painted sRGB.
    pub rgb: [u8; 3],
    /// Where it was drawn (reuse it with [`ObjectSpec::exact`]).
    pub placement: Placement,
    /// Larger side of the placement box / image side.
    pub extent: f64,
    /// Box of its visible pixels, `[x0, y0, x1, y1]`, x1/y1 exclusive.
    pub bbox: [u32; 4],
    /// Mean of its visible pixel centres.
    pub centroid: [f64; 2],
    /// Visible pixels (what its mask holds).
    pub pixel_count: u32,
    /// Pixels it would have with nothing in front of it.
    pub unoccluded_pixel_count: u32,
    /// Nothing else was allowed near it.
    pub keep_clear: bool,
}

/// Everything about a scene except its pixels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SceneMeta {
    pub seed: u64,
    /// The image is `size`×`size`.
    pub size: u32,
    pub caption: String,
    pub background: Background,
    /// Back to front (later objects are drawn over earlier ones).
    pub objects: Vec<ObjectInfo>,
}

/// A generated scene.
#[derive(Clone, Debug)]
pub struct Scene {
    pub meta: SceneMeta,
    pub image: RgbImage,
    /// One per object (same order as `meta.objects`): exactly the pixels painted in
    /// that object's colour in the final image. Disjoint; their union is every
    /// non-background pixel.
    pub masks: Vec<Mask>,
    /// Row-major owner of each pixel: 0 = background, `k + 1` = object `k`.
    pub owner: Vec<u8>,
}

impl Scene {
    pub fn caption(&self) -> &str {
        &self.meta.caption
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.meta).expect("serialisable")
    }

    /// Union of all object masks.
    pub fn foreground(&self) -> Mask {
        Mask {
            width: self.meta.size,
            height: self.meta.size,
            data: self.owner.iter().map(|&o| (o > 0) as u8).collect(),
        }
    }

    /// FNV-1a over image bytes, masks and caption.
    pub fn hash(&self) -> u64 {
        let mut bytes = self.image.as_raw().clone();
        bytes.extend_from_slice(&self.owner);
        bytes.extend_from_slice(self.meta.caption.as_bytes());
        crate::fnv1a64(&bytes)
    }
}

// ---------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------

/// Constraints on one object. `None` fields are drawn at random.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ObjectSpec {
    pub shape: Option<Shape>,
    pub colour: Option<Colour>,
    pub size: Option<Size>,
    pub position: Option<Position>,
    /// Draw it exactly here (position and size then follow from the box unless given).
    pub placement: Option<Placement>,
    /// No other object may overlap or touch it (a 2-pixel moat): use it for the
    /// protected object of "reference + protected region" scenes.
    pub keep_clear: bool,
}

impl ObjectSpec {
    pub fn any() -> Self {
        Self::default()
    }

    pub fn new(shape: Shape, colour: Colour) -> Self {
        ObjectSpec { shape: Some(shape), colour: Some(colour), ..Self::default() }
    }

    pub fn at(mut self, position: Position) -> Self {
        self.position = Some(position);
        self
    }

    pub fn sized(mut self, size: Size) -> Self {
        self.size = Some(size);
        self
    }

    pub fn kept_clear(mut self) -> Self {
        self.keep_clear = true;
        self
    }

    /// The same object, drawn at the same place (for a scene that must contain it
    /// unchanged); `keep_clear` is set.
    pub fn exact(info: &ObjectInfo) -> Self {
        ObjectSpec {
            shape: Some(info.shape),
            colour: Some(info.colour),
            size: Some(info.size),
            position: Some(info.position),
            placement: Some(info.placement),
            keep_clear: true,
        }
    }
}

/// Constraints on the background.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum BackgroundSpec {
    #[default]
    Any,
    Kind(BgKind),
    Solid(Colour),
    Exact(Background),
}

/// Generator settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenConfig {
    /// Image side in pixels (≥ 32; 64 by default; 128 works).
    pub size: u32,
    pub min_objects: usize,
    pub max_objects: usize,
    /// The first objects (back to front); the rest are random.
    pub objects: Vec<ObjectSpec>,
    pub background: BackgroundSpec,
    /// Largest fraction of an object that later objects may cover. (Its outermost
    /// pixels are never covered, so its box and size stay visible.)
    pub max_occlusion: f64,
    pub caption: CaptionStyle,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            size: 64,
            min_objects: 1,
            max_objects: 3,
            objects: Vec::new(),
            background: BackgroundSpec::Any,
            max_occlusion: 0.1,
            caption: CaptionStyle::default(),
        }
    }
}

impl GenConfig {
    pub fn with_size(mut self, size: u32) -> Self {
        self.size = size;
        self
    }

    pub fn with_objects(mut self, n: usize) -> Self {
        self.min_objects = n;
        self.max_objects = n;
        self
    }

    pub fn with_object(mut self, spec: ObjectSpec) -> Self {
        self.objects.push(spec);
        self
    }

    pub fn with_background(mut self, bg: BackgroundSpec) -> Self {
        self.background = bg;
        self
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GenError {
    /// The config contradicts itself (e.g. a cyan object on a light blue background).
    Invalid(String),
    /// No placement satisfying the constraints was found.
    NoRoom(String),
}

impl std::fmt::Display for GenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GenError::Invalid(s) => write!(f, "invalid shapes config: {s}"),
            GenError::NoRoom(s) => write!(f, "could not place objects: {s}"),
        }
    }
}

impl std::error::Error for GenError {}

// ---------------------------------------------------------------------------------
// Generator
// ---------------------------------------------------------------------------------

/// `generate(seed, &GenConfig::default())`, which cannot fail.
pub fn generate_default(seed: u64) -> Scene {
    generate(seed, &GenConfig::default()).expect("the default config always succeeds")
}

const ATTEMPTS: usize = 40;
const TRIES: usize = 20;

struct Placed {
    shape: Shape,
    colour: Colour,
    size: Size,
    position: Position,
    placement: Placement,
    exact: bool,
    keep_clear: bool,
    pixels: Vec<u32>,
}

/// Draw a scene. Deterministic: the same seed and config give the same bytes.
pub fn generate(seed: u64, cfg: &GenConfig) -> Result<Scene, GenError> {
    let s = cfg.size;
    if !(32..=1024).contains(&s) {
        return Err(GenError::Invalid(format!("size {s} (must be 32..=1024)")));
    }
    if cfg.min_objects > cfg.max_objects || cfg.max_objects > 9 {
        return Err(GenError::Invalid(format!("objects {}..={}", cfg.min_objects, cfg.max_objects)));
    }
    if cfg.objects.len() > cfg.max_objects {
        return Err(GenError::Invalid(format!(
            "{} forced objects > max_objects {}",
            cfg.objects.len(),
            cfg.max_objects
        )));
    }
    let mut rng = Rng::new(seed);
    let n = (cfg.min_objects + rng.below((cfg.max_objects - cfg.min_objects) as u64 + 1) as usize)
        .max(cfg.objects.len())
        .max(1);

    let background = draw_background(&mut rng, s, &cfg.background, &cfg.objects)?;
    let bg_colours = background.colours();
    let allowed: Vec<Colour> =
        Colour::OBJECT.iter().copied().filter(|c| bg_colours.iter().all(|&b| c.contrasts_with(b))).collect();

    // Validate forced attributes.
    for (i, spec) in cfg.objects.iter().enumerate() {
        if let Some(c) = spec.colour {
            if !c.is_object() {
                return Err(GenError::Invalid(format!("object {i}: {c} is a background colour")));
            }
            if !allowed.contains(&c) {
                return Err(GenError::Invalid(format!("object {i}: {c} does not contrast with the background")));
            }
            if cfg.objects[..i].iter().any(|o| o.colour == Some(c)) {
                return Err(GenError::Invalid(format!("object {i}: colour {c} used twice")));
            }
        }
        if let Some(p) = spec.position {
            if cfg.objects[..i].iter().any(|o| o.position == Some(p)) {
                return Err(GenError::Invalid(format!("object {i}: position {p} used twice")));
            }
        }
    }

    let area = (s * s) as usize;
    let mut owner = vec![0u8; area];
    let mut placed: Vec<Placed> = Vec::new();
    for i in 0..n {
        let spec = cfg.objects.get(i).cloned().unwrap_or_default();
        let mut ok = false;
        'attempts: for _ in 0..ATTEMPTS {
            let colour = match spec.colour {
                Some(c) => c,
                None => {
                    let free: Vec<Colour> = allowed
                        .iter()
                        .copied()
                        .filter(|c| {
                            !placed.iter().any(|p| p.colour == *c) && !cfg.objects.iter().any(|o| o.colour == Some(*c))
                        })
                        .collect();
                    if free.is_empty() {
                        return Err(GenError::Invalid("no free object colour left".into()));
                    }
                    rng.pick(&free)
                }
            };
            let shape = spec.shape.unwrap_or_else(|| rng.pick(Shape::ALL));
            let size = match (spec.size, spec.placement) {
                (Some(z), _) => z,
                (None, Some(p)) => Size::classify(p.w.max(p.h) / s as f64),
                (None, None) => rng.pick(Size::ALL),
            };
            let position = match (spec.position, spec.placement) {
                (Some(p), _) => Some(p),
                (None, Some(_)) => None,
                (None, None) => {
                    let free: Vec<Position> = Position::ALL
                        .iter()
                        .copied()
                        .filter(|q| {
                            !placed.iter().any(|p| p.position == *q)
                                && !cfg.objects.iter().any(|o| o.position == Some(*q))
                        })
                        .collect();
                    Some(rng.pick(&free))
                }
            };
            let tries = if spec.placement.is_some() { 1 } else { TRIES };
            for _ in 0..tries {
                let placement = match spec.placement {
                    Some(p) => p,
                    None => jitter(&mut rng, s, shape, size, position.unwrap()),
                };
                let mut pixels = Vec::new();
                raster(shape, placement.x0, placement.y0, placement.w, placement.h, s, s, |x, y| {
                    pixels.push(y * s + x)
                });
                if pixels.is_empty() {
                    continue;
                }
                let cand = Placed {
                    shape,
                    colour,
                    size,
                    position: position.unwrap_or(Position::Centre),
                    placement,
                    exact: spec.placement.is_some(),
                    keep_clear: spec.keep_clear,
                    pixels,
                };
                if let Some((new_owner, pos)) =
                    try_place(s, &owner, &placed, &cand, position.is_some(), cfg.max_occlusion)
                {
                    owner = new_owner;
                    placed.push(Placed { position: pos, ..cand });
                    ok = true;
                    break 'attempts;
                }
            }
            if spec.placement.is_some() {
                break;
            }
        }
        if !ok {
            return Err(GenError::NoRoom(format!("object {i} ({:?}) after {} attempts", spec, ATTEMPTS)));
        }
    }

    // Render.
    let mut image = RgbImage::new(s, s);
    for y in 0..s {
        for x in 0..s {
            let o = owner[(y * s + x) as usize];
            let rgb = if o == 0 { background.pixel(x, y, s) } else { placed[o as usize - 1].colour.rgb() };
            image.put_pixel(x, y, image::Rgb(rgb));
        }
    }
    let mut masks = Vec::with_capacity(placed.len());
    let mut objects = Vec::with_capacity(placed.len());
    for (k, p) in placed.iter().enumerate() {
        let mask = Mask { width: s, height: s, data: owner.iter().map(|&o| (o as usize == k + 1) as u8).collect() };
        objects.push(ObjectInfo {
            shape: p.shape,
            colour: p.colour,
            size: p.size,
            position: p.position,
            rgb: p.colour.rgb(),
            placement: p.placement,
            extent: p.placement.w.max(p.placement.h) / s as f64,
            bbox: mask.bbox().unwrap_or([0; 4]),
            centroid: mask.centroid().unwrap_or([0.0; 2]),
            pixel_count: mask.count(),
            unoccluded_pixel_count: p.pixels.len() as u32,
            keep_clear: p.keep_clear,
        });
        masks.push(mask);
    }
    let caption = caption::caption(&objects, &background, &cfg.caption);
    Ok(Scene { meta: SceneMeta { seed, size: s, caption, background, objects }, image, masks, owner })
}

fn jitter(rng: &mut Rng, s: u32, shape: Shape, size: Size, position: Position) -> Placement {
    let sf = s as f64;
    let cell = sf / 3.0;
    let (lo, hi) = size.extent_range();
    let extent = sf * rng.range_f64(lo, hi);
    let (aw, ah) = shape.aspect();
    let (w, h) = (extent * aw, extent * ah);
    let cx = (position.col() as f64 + 0.5) * cell + rng.range_f64(-0.3, 0.3) * cell;
    let cy = (position.row() as f64 + 0.5) * cell + rng.range_f64(-0.3, 0.3) * cell;
    let m = (0.03 * sf).max(1.0);
    let x0 = (cx - 0.5 * w).max(m).min(sf - m - w);
    let y0 = (cy - 0.5 * h).max(m).min(sf - m - h);
    // Multiples of 1/256 px: short, exact decimals, so a placement read back from
    // JSON (by any parser) redraws exactly the same pixels.
    let q = |v: f64| (v * 256.0).floor() / 256.0;
    Placement { x0: q(x0), y0: q(y0), w: q(w), h: q(h) }
}

fn pixels_bbox(pixels: &[u32], s: u32) -> [u32; 4] {
    let mut b = [u32::MAX, u32::MAX, 0, 0];
    for &p in pixels {
        let (x, y) = (p % s, p / s);
        b = [b[0].min(x), b[1].min(y), b[2].max(x + 1), b[3].max(y + 1)];
    }
    b
}

/// Margin (pixels) the centroid must keep from a cell border it could cross.
fn centroid_margin(s: u32) -> f64 {
    (0.025 * s as f64).max(1.0)
}

fn centroid_ok(c: [f64; 2], pos: Position, s: u32) -> bool {
    let cell = s as f64 / 3.0;
    let m = centroid_margin(s);
    let axis_ok = |v: f64, k: u32| {
        let lo = k as f64 * cell;
        let hi = (k + 1) as f64 * cell;
        v >= lo + if k == 0 { 0.0 } else { m } && v <= hi - if k == 2 { 0.0 } else { m }
    };
    axis_ok(c[0], pos.col()) && axis_ok(c[1], pos.row())
}

/// Paint `cand` over `owner` and check every object's constraints. Returns the new
/// owner map and the candidate's position.
fn try_place(
    s: u32,
    owner: &[u8],
    placed: &[Placed],
    cand: &Placed,
    position_given: bool,
    max_occlusion: f64,
) -> Option<(Vec<u8>, Position)> {
    let k = placed.len() + 1;
    // Keep-clear objects: no pixel of the candidate within 2 px of them (and no
    // keep-clear candidate within 2 px of anything already there).
    let near = |p: u32, pred: &dyn Fn(u8) -> bool| {
        let (x, y) = ((p % s) as i64, (p / s) as i64);
        for dy in -2..=2i64 {
            for dx in -2..=2i64 {
                let (nx, ny) = (x + dx, y + dy);
                if nx >= 0 && ny >= 0 && nx < s as i64 && ny < s as i64 && pred(owner[(ny * s as i64 + nx) as usize]) {
                    return true;
                }
            }
        }
        false
    };
    let clear_ids: Vec<u8> =
        placed.iter().enumerate().filter(|(_, p)| p.keep_clear).map(|(j, _)| j as u8 + 1).collect();
    if !clear_ids.is_empty() && cand.pixels.iter().any(|&p| near(p, &|o| clear_ids.contains(&o))) {
        return None;
    }
    if cand.keep_clear && cand.pixels.iter().any(|&p| near(p, &|o| o != 0)) {
        return None;
    }

    let mut new_owner = owner.to_vec();
    for &p in &cand.pixels {
        new_owner[p as usize] = k as u8;
    }
    let mut cand_pos = cand.position;
    for j in 1..=k {
        let obj = if j == k { cand } else { &placed[j - 1] };
        let mask = Mask { width: s, height: s, data: new_owner.iter().map(|&o| (o as usize == j) as u8).collect() };
        let visible = mask.count();
        if (visible as f64) < (1.0 - max_occlusion) * obj.pixels.len() as f64 || !mask.is_connected() {
            return None;
        }
        // Its full extent stays visible: nothing covers its outermost pixels (tips of
        // stars and triangles, corners of squares...), so the box shows its true size.
        if visible as usize != obj.pixels.len() && mask.bbox() != Some(pixels_bbox(&obj.pixels, s)) {
            return None;
        }
        let c = mask.centroid()?;
        if j == k && !position_given {
            cand_pos = Position::of_point(c[0], c[1], s, s);
            continue;
        }
        let pos = if j == k { cand.position } else { obj.position };
        if obj.exact {
            if Position::of_point(c[0], c[1], s, s) != pos {
                return None;
            }
        } else if !centroid_ok(c, pos, s) {
            return None;
        }
    }
    Some((new_owner, cand_pos))
}

fn draw_background(
    rng: &mut Rng,
    s: u32,
    spec: &BackgroundSpec,
    forced: &[ObjectSpec],
) -> Result<Background, GenError> {
    let forced_colours: Vec<Colour> = forced.iter().filter_map(|o| o.colour).collect();
    let fits = |cols: &[Colour]| forced_colours.iter().all(|&o| cols.iter().all(|&b| o.contrasts_with(b)));
    let bg_ok = |c: Colour| fits(&[c]);
    let kind = match spec {
        BackgroundSpec::Exact(b) => {
            if b.colours().iter().any(|c| c.is_object()) {
                return Err(GenError::Invalid(format!("background {b:?} uses an object colour")));
            }
            return Ok(b.clone());
        }
        BackgroundSpec::Solid(c) => {
            if !c.is_background() {
                return Err(GenError::Invalid(format!("{c} is not a background colour")));
            }
            return Ok(Background::Solid { colour: *c });
        }
        BackgroundSpec::Kind(k) => *k,
        // Solid 40 %, the other kinds 20 % each.
        BackgroundSpec::Any => match rng.below(5) {
            0 | 1 => BgKind::Solid,
            2 => BgKind::Gradient,
            3 => BgKind::Stripes,
            _ => BgKind::Checks,
        },
    };
    let sf = s as f64;
    let pair = |rng: &mut Rng| -> Result<[Colour; 2], GenError> {
        let pairs: Vec<[Colour; 2]> = Colour::BACKGROUND
            .iter()
            .flat_map(|&a| Colour::BACKGROUND.iter().map(move |&b| [a, b]))
            .filter(|p| p[0] != p[1] && fits(p))
            .collect();
        if pairs.is_empty() {
            return Err(GenError::Invalid("no background pair fits the forced colours".into()));
        }
        Ok(rng.pick(&pairs))
    };
    let dir = |rng: &mut Rng| {
        if rng.chance(1, 2) {
            Direction::Horizontal
        } else {
            Direction::Vertical
        }
    };
    Ok(match kind {
        BgKind::Solid => {
            let cols: Vec<Colour> = Colour::BACKGROUND.iter().copied().filter(|&c| bg_ok(c)).collect();
            if cols.is_empty() {
                return Err(GenError::Invalid("no background colour fits the forced colours".into()));
            }
            Background::Solid { colour: rng.pick(&cols) }
        }
        BgKind::Gradient => {
            let pairs: Vec<(Colour, Colour)> = GRADIENT_PAIRS.iter().copied().filter(|&(a, b)| fits(&[a, b])).collect();
            if pairs.is_empty() {
                return Err(GenError::Invalid("no gradient fits the forced colours".into()));
            }
            let (a, b) = rng.pick(&pairs);
            let (from, to) = if rng.chance(1, 2) { (a, b) } else { (b, a) };
            Background::Gradient { from, to, direction: dir(rng) }
        }
        BgKind::Stripes => {
            let colours = pair(rng)?;
            let direction = dir(rng);
            // 4–8 px at 64×64.
            let width = ((sf * rng.range_f64(4.0, 8.0) / 64.0) as u32).max(2);
            let offset = rng.below(2 * width as u64) as u32;
            Background::Stripes { colours, direction, width, offset }
        }
        BgKind::Checks => {
            let colours = pair(rng)?;
            // 6–10 px at 64×64.
            let cell = ((sf * rng.range_f64(6.0, 10.0) / 64.0) as u32).max(2);
            let offset_x = rng.below(2 * cell as u64) as u32;
            let offset_y = rng.below(2 * cell as u64) as u32;
            Background::Checks { colours, cell, offset_x, offset_y }
        }
    })
}
