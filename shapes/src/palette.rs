//! Named colours: the object palette, the background palette, and CIELAB distances.
//!
//! The two palettes are disjoint on purpose: any pixel whose nearest named colour is
//! a background colour belongs to the background, so the judge never has to decide
//! whether a white square is an object or a check cell.

use std::sync::OnceLock;

/// Every named colour of the shapes world.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Colour {
    // Object colours (saturated).
    Red,
    Orange,
    Yellow,
    Green,
    Cyan,
    Blue,
    Purple,
    Pink,
    Brown,
    // Background colours (neutral / dark / pale).
    White,
    Black,
    Grey,
    DarkBlue,
    DarkGreen,
    Beige,
    LightBlue,
}

crate::named_enum!(Colour {
    Red => "red",
    Orange => "orange",
    Yellow => "yellow",
    Green => "green",
    Cyan => "cyan",
    Blue => "blue",
    Purple => "purple",
    Pink => "pink",
    Brown => "brown",
    White => "white",
    Black => "black",
    Grey => "grey",
    DarkBlue => "dark blue",
    DarkGreen => "dark green",
    Beige => "beige",
    LightBlue => "light blue",
});

use Colour::*;

impl Colour {
    /// Colours an object can have.
    pub const OBJECT: [Colour; 9] = [Red, Orange, Yellow, Green, Cyan, Blue, Purple, Pink, Brown];
    /// Colours a background can have.
    pub const BACKGROUND: [Colour; 7] = [White, Black, Grey, DarkBlue, DarkGreen, Beige, LightBlue];

    /// The exact sRGB value the generator paints.
    pub const fn rgb(self) -> [u8; 3] {
        match self {
            Red => [220, 30, 30],
            Orange => [250, 140, 20],
            Yellow => [245, 225, 40],
            Green => [40, 170, 50],
            Cyan => [40, 210, 220],
            Blue => [30, 80, 235],
            Purple => [150, 40, 165],
            Pink => [250, 130, 200],
            Brown => [125, 75, 35],
            White => [245, 245, 245],
            Black => [20, 20, 20],
            Grey => [128, 128, 128],
            DarkBlue => [25, 35, 100],
            DarkGreen => [25, 80, 45],
            Beige => [225, 205, 160],
            LightBlue => [165, 195, 230],
        }
    }

    pub fn is_object(self) -> bool {
        Colour::OBJECT.contains(&self)
    }

    pub fn is_background(self) -> bool {
        !self.is_object()
    }

    /// "a" or "an" before this colour's name.
    pub fn article(self) -> &'static str {
        if matches!(self.name().as_bytes()[0], b'a' | b'e' | b'i' | b'o' | b'u') {
            "an"
        } else {
            "a"
        }
    }

    /// CIELAB (D65) of the painted colour.
    pub fn lab(self) -> [f32; 3] {
        srgb_to_lab(self.rgb())
    }

    /// May an object of colour `self` stand on background colour `bg`?
    /// (All object/background pairs are at least ΔE 44 apart, except the ones listed
    /// in [`LOW_CONTRAST`]; a test checks that.)
    pub fn contrasts_with(self, bg: Colour) -> bool {
        self != bg && !LOW_CONTRAST.contains(&(self, bg))
    }
}

/// Object/background pairs with too little contrast (ΔE76 < 44): never generated.
pub const LOW_CONTRAST: &[(Colour, Colour)] = &[(Cyan, LightBlue), (Brown, Grey)];

/// Background pairs allowed for gradients: every colour on the straight sRGB line
/// between them is nearer (in Lab) to one of the two ends than to any other named
/// colour, so a gradient never looks like a third colour, let alone an object colour.
pub const GRADIENT_PAIRS: &[(Colour, Colour)] = &[
    (White, Beige),
    (White, LightBlue),
    (Black, Grey),
    (Black, DarkBlue),
    (Black, DarkGreen),
    (Grey, DarkBlue),
    (Grey, DarkGreen),
    (Grey, Beige),
    (Grey, LightBlue),
];

fn srgb_lut() -> &'static [f32; 256] {
    static LUT: OnceLock<[f32; 256]> = OnceLock::new();
    LUT.get_or_init(|| {
        let mut t = [0f32; 256];
        for (i, v) in t.iter_mut().enumerate() {
            let c = i as f64 / 255.0;
            *v = if c <= 0.04045 { c / 12.92 } else { ((c + 0.055) / 1.055).powf(2.4) } as f32;
        }
        t
    })
}

/// sRGB (8-bit) to CIELAB, D65 white. (Used by the judge only; the generator never
/// touches floating-point colour maths.)
pub fn srgb_to_lab(rgb: [u8; 3]) -> [f32; 3] {
    let lut = srgb_lut();
    let (r, g, b) = (lut[rgb[0] as usize], lut[rgb[1] as usize], lut[rgb[2] as usize]);
    let x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047;
    let y = 0.2126 * r + 0.7152 * g + 0.0722 * b;
    let z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883;
    let f = |t: f32| {
        if t > 0.008856 {
            t.cbrt()
        } else {
            7.787 * t + 16.0 / 116.0
        }
    };
    let (fx, fy, fz) = (f(x), f(y), f(z));
    [116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)]
}

/// CIE76 colour difference.
pub fn delta_e(a: [f32; 3], b: [f32; 3]) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

/// The named colour nearest to `lab` among `candidates`, with its distance.
pub fn nearest(lab: [f32; 3], candidates: &[Colour]) -> (Colour, f32) {
    let mut best = (candidates[0], f32::INFINITY);
    for &c in candidates {
        let d = delta_e(lab, c.lab());
        if d < best.1 {
            best = (c, d);
        }
    }
    best
}

/// Integer linear interpolation between two sRGB colours: step `i` of `n` (0..=n).
pub fn lerp_rgb(a: [u8; 3], b: [u8; 3], i: u32, n: u32) -> [u8; 3] {
    if n == 0 {
        return a;
    }
    let mut out = [0u8; 3];
    for k in 0..3 {
        let v = (a[k] as u32 * (n - i) + b[k] as u32 * i + n / 2) / n;
        out[k] = v as u8;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn palettes_are_disjoint_and_complete() {
        for &c in Colour::ALL {
            assert_eq!(c.is_object(), !Colour::BACKGROUND.contains(&c));
            assert_eq!(Colour::from_name(c.name()), Some(c));
        }
    }

    #[test]
    fn named_colours_are_far_apart() {
        for &a in Colour::ALL {
            for &b in Colour::ALL {
                if a != b {
                    let d = delta_e(a.lab(), b.lab());
                    // Background-vs-background pairs may be closer; the judge never
                    // has to separate those to find objects.
                    let min = if a.is_object() || b.is_object() { 34.0 } else { 25.0 };
                    assert!(d >= min, "{a:?} vs {b:?}: ΔE {d}");
                }
            }
        }
    }

    #[test]
    fn low_contrast_table_is_exact() {
        for o in Colour::OBJECT {
            for b in Colour::BACKGROUND {
                let d = delta_e(o.lab(), b.lab());
                assert_eq!(o.contrasts_with(b), d >= 44.0, "{o:?} on {b:?}: ΔE {d}");
            }
        }
    }

    #[test]
    fn gradient_pairs_stay_on_their_ends() {
        for &(a, b) in GRADIENT_PAIRS {
            for i in 0..=64 {
                let c = lerp_rgb(a.rgb(), b.rgb(), i, 64);
                let (n, _) = nearest(srgb_to_lab(c), Colour::ALL);
                assert!(n == a || n == b, "{a:?}-{b:?} step {i}: {c:?} looks {n:?}");
            }
        }
    }

    #[test]
    fn any_background_mix_is_never_an_object_colour() {
        // Blurred stripe/check edges mix two background colours.
        for a in Colour::BACKGROUND {
            for b in Colour::BACKGROUND {
                for i in 0..=16 {
                    let c = lerp_rgb(a.rgb(), b.rgb(), i, 16);
                    let (n, _) = nearest(srgb_to_lab(c), Colour::ALL);
                    assert!(n.is_background(), "{a:?}-{b:?} step {i}: {c:?} looks {n:?}");
                }
            }
        }
    }
}
