//! The shapes, defined in their own unit bounding box.
//!
//! Every shape is upright and fills the unit box `[0,1]²` (u to the right, v down)
//! edge to edge. The generator maps that box onto the image; the judge maps it onto
//! a found component's bounding box to score how well each shape fits. Only IEEE
//! basic operations (+ − × ÷) are used, so rendering is bit-identical everywhere.

/// An object's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
    Ring,
    Cross,
    Diamond,
}

crate::named_enum!(Shape {
    Circle => "circle",
    Square => "square",
    Triangle => "triangle",
    Star => "star",
    Ring => "ring",
    Cross => "cross",
    Diamond => "diamond",
});

/// Inner radius of a ring, as a fraction of its outer radius.
pub const RING_INNER: f64 = 0.5;
/// Half the width of a cross's arms, as a fraction of the cross's extent.
pub const CROSS_HALF_ARM: f64 = 0.18;
/// Inner radius of the star's 5 notches, as a fraction of its outer radius.
pub const STAR_INNER: f64 = 0.45;

/// The 5-pointed star (outer radius 1, inner 0.45, point up), normalised to its box.
const STAR: [[f64; 2]; 10] = [
    [0.5, 0.0],
    [0.6390576474687264, 0.351540286525061],
    [1.0, 0.38196601125010515],
    [0.725, 0.6296555814625137],
    [0.8090169943749475, 1.0],
    [0.5, 0.8015402865250609],
    [0.19098300562505266, 1.0],
    [0.275, 0.6296555814625137],
    [0.0, 0.38196601125010515],
    [0.36094235253127366, 0.351540286525061],
];

impl Shape {
    /// Width and height of the shape's box relative to its extent (the larger side is 1).
    pub fn aspect(self) -> (f64, f64) {
        match self {
            // Equilateral, point up: height = √3/2 · width.
            Shape::Triangle => (1.0, 0.8660254037844386),
            // Regular star: height / width = (1 + cos 36°) / (2 cos 18°).
            Shape::Star => (1.0, 0.9510565162951535),
            _ => (1.0, 1.0),
        }
    }

    /// Is the point `(u, v)` of the unit box inside the shape?
    pub fn inside_unit(self, u: f64, v: f64) -> bool {
        if !(0.0..=1.0).contains(&u) || !(0.0..=1.0).contains(&v) {
            return false;
        }
        let (du, dv) = (u - 0.5, v - 0.5);
        match self {
            Shape::Circle => du * du + dv * dv <= 0.25,
            Shape::Square => true,
            Shape::Ring => {
                let r2 = du * du + dv * dv;
                let inner = 0.5 * RING_INNER;
                r2 <= 0.25 && r2 >= inner * inner
            }
            Shape::Diamond => du.abs() + dv.abs() <= 0.5,
            Shape::Triangle => du.abs() <= 0.5 * v,
            Shape::Cross => du.abs() <= CROSS_HALF_ARM || dv.abs() <= CROSS_HALF_ARM,
            Shape::Star => point_in_polygon(&STAR, u, v),
        }
    }

    /// Area of the shape as a fraction of its box.
    pub fn unit_area(self) -> f64 {
        let a = 2.0 * CROSS_HALF_ARM;
        match self {
            Shape::Circle => std::f64::consts::FRAC_PI_4,
            Shape::Ring => std::f64::consts::FRAC_PI_4 * (1.0 - RING_INNER * RING_INNER),
            Shape::Square => 1.0,
            Shape::Diamond | Shape::Triangle => 0.5,
            Shape::Cross => 2.0 * a - a * a,
            // 10 triangles of sides 1 and 0.45 at 36°, over the box 1.9021 × 1.8090.
            Shape::Star => 1.322_524_4 / 3.440_954_8,
        }
    }

    /// Does the shape have a hole?
    pub fn has_hole(self) -> bool {
        self == Shape::Ring
    }
}

/// Even-odd rule.
fn point_in_polygon(poly: &[[f64; 2]], x: f64, y: f64) -> bool {
    let mut inside = false;
    let n = poly.len();
    let mut j = n - 1;
    for i in 0..n {
        let [xi, yi] = poly[i];
        let [xj, yj] = poly[j];
        if (yi > y) != (yj > y) {
            let xc = xi + (y - yi) * (xj - xi) / (yj - yi);
            if x < xc {
                inside = !inside;
            }
        }
        j = i;
    }
    inside
}

/// Pixels of a `width`×`height` grid whose centres fall inside `shape` drawn in the
/// continuous box `(x0, y0, w, h)`. Calls `f(x, y)` for each, row by row.
#[allow(clippy::too_many_arguments)]
pub fn raster(shape: Shape, x0: f64, y0: f64, w: f64, h: f64, width: u32, height: u32, mut f: impl FnMut(u32, u32)) {
    let xa = (x0 - 1.0).floor().max(0.0) as i64;
    let ya = (y0 - 1.0).floor().max(0.0) as i64;
    let xb = ((x0 + w + 1.0).ceil() as i64).min(width as i64);
    let yb = ((y0 + h + 1.0).ceil() as i64).min(height as i64);
    for y in ya..yb {
        let v = (y as f64 + 0.5 - y0) / h;
        for x in xa..xb {
            let u = (x as f64 + 0.5 - x0) / w;
            if shape.inside_unit(u, v) {
                f(x as u32, y as u32);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area(shape: Shape, n: u32) -> f64 {
        let mut c = 0;
        raster(shape, 0.0, 0.0, n as f64, n as f64, n, n, |_, _| c += 1);
        c as f64 / (n * n) as f64
    }

    #[test]
    fn unit_areas_match_geometry() {
        let n = 400;
        let close = |a: f64, b: f64| (a - b).abs() < 0.01;
        assert!(close(area(Shape::Circle, n), std::f64::consts::PI / 4.0));
        assert!(close(area(Shape::Square, n), 1.0));
        assert!(close(area(Shape::Diamond, n), 0.5));
        assert!(close(area(Shape::Triangle, n), 0.5));
        assert!(close(area(Shape::Ring, n), std::f64::consts::PI / 4.0 * 0.75));
        let a = 2.0 * CROSS_HALF_ARM;
        assert!(close(area(Shape::Cross, n), 2.0 * a - a * a));
        assert!(close(area(Shape::Star, n), Shape::Star.unit_area()));
        for &s in Shape::ALL {
            assert!(close(area(s, n), s.unit_area()), "{s:?}");
        }
    }

    #[test]
    fn shapes_touch_all_four_sides() {
        for &s in Shape::ALL {
            let n = 101u32;
            let (mut x0, mut y0, mut x1, mut y1) = (n, n, 0, 0);
            raster(s, 0.0, 0.0, n as f64, n as f64, n, n, |x, y| {
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x);
                y1 = y1.max(y);
            });
            assert!(x0 <= 1 && y0 <= 1 && x1 >= n - 2 && y1 >= n - 2, "{s:?}: {x0} {y0} {x1} {y1}");
        }
    }
}
