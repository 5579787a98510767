//! Property tests of image loading: random bytes, and valid PNGs and JPEGs with bytes
//! flipped, cut short or their declared size rewritten, through the header read admission
//! does and the decode the engine thread does (`EncodedImage`). Neither panics, a decoded
//! image has the size its header declared, and no read or decode allocates more than the
//! decode limit. A counting allocator measures the allocations (one test in this binary,
//! so nothing else allocates meanwhile).
use frisket_server::service::encoded_image::{EncodedImage, MAX_DECODED_BYTES};
use frisket_server::service::Limits;
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let now = LIVE.fetch_add(bytes, Relaxed) + bytes;
    PEAK.fetch_max(now, Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, layout, new_size) };
        if !q.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// PNG's CRC-32 (of a chunk's type and data).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A valid image: `kind` picks PNG (grey, grey+alpha, RGB, RGBA, 16-bit RGB, 16-bit grey)
/// or JPEG (RGB, grey).
fn valid_image(kind: u8, width: u32, height: u32, seed: u8) -> Vec<u8> {
    let rgb = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x as u8).wrapping_mul(seed), (y as u8).wrapping_add(seed), seed ^ (x + y) as u8])
    });
    let img = image::DynamicImage::ImageRgb8(rgb);
    let (img, format) = match kind % 8 {
        0 => (image::DynamicImage::ImageLuma8(img.to_luma8()), image::ImageFormat::Png),
        1 => (image::DynamicImage::ImageLumaA8(img.to_luma_alpha8()), image::ImageFormat::Png),
        2 => (img, image::ImageFormat::Png),
        3 => (image::DynamicImage::ImageRgba8(img.to_rgba8()), image::ImageFormat::Png),
        4 => (image::DynamicImage::ImageRgb16(img.to_rgb16()), image::ImageFormat::Png),
        5 => (image::DynamicImage::ImageLuma16(img.to_luma16()), image::ImageFormat::Png),
        6 => (img, image::ImageFormat::Jpeg),
        _ => (image::DynamicImage::ImageLuma8(img.to_luma8()), image::ImageFormat::Jpeg),
    };
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// Rewrites the size a PNG's IHDR (CRC fixed) or a JPEG's first SOF declares.
fn declare_size(bytes: &mut [u8], width: u32, height: u32) {
    if bytes.starts_with(b"\x89PNG") && bytes.len() >= 33 {
        bytes[16..20].copy_from_slice(&width.to_be_bytes());
        bytes[20..24].copy_from_slice(&height.to_be_bytes());
        let crc = crc32(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    } else if let Some(sof) = bytes.windows(2).position(|w| w[0] == 0xff && matches!(w[1], 0xc0..=0xc2)) {
        if bytes.len() >= sof + 9 {
            bytes[sof + 5..sof + 7].copy_from_slice(&(height as u16).to_be_bytes());
            bytes[sof + 7..sof + 9].copy_from_slice(&(width as u16).to_be_bytes());
        }
    }
}

#[derive(Debug, Clone)]
struct Mutation {
    flips: Vec<(usize, u8)>,
    cut: Option<usize>,
    size: Option<(u32, u32)>,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let dimension = prop_oneof![0u32..70, 4000u32..4200, 65_000u32..65_536, any::<u32>()];
    (
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        prop::option::of(any::<usize>()),
        prop::option::weighted(0.4, (dimension.clone(), dimension)),
    )
        .prop_map(|(flips, cut, size)| Mutation { flips, cut, size })
}

fn mutated_image() -> impl Strategy<Value = Vec<u8>> {
    (any::<u8>(), 1u32..48, 1u32..48, any::<u8>(), mutation()).prop_map(|(kind, w, h, seed, m)| {
        let mut bytes = valid_image(kind, w, h, seed);
        if let Some((w, h)) = m.size {
            declare_size(&mut bytes, w, h);
        }
        let len = bytes.len();
        for (at, value) in m.flips {
            bytes[at % len] ^= value;
        }
        if let Some(cut) = m.cut {
            bytes.truncate(cut % (len + 1));
        }
        bytes
    })
}

fn image_bytes() -> impl Strategy<Value = Vec<u8>> {
    let random = prop::collection::vec(any::<u8>(), 0..2048);
    prop_oneof![
        1 => random.clone(),
        // Random bytes behind a signature, so they reach a decoder.
        1 => random.clone().prop_map(|r| [b"\x89PNG\r\n\x1a\n".as_slice(), &r].concat()),
        1 => random.prop_map(|r| [[0xff, 0xd8, 0xff].as_slice(), &r].concat()),
        5 => mutated_image(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn image_loading_never_panics_and_stays_within_its_limits(bytes in image_bytes()) {
        let max_side = Limits::default().max_side;
        let base = LIVE.load(Relaxed);
        PEAK.store(base, Relaxed);
        // What a decode may allocate: the declared pixels at 8 bytes each (16-bit RGBA, the
        // widest of PNG and JPEG), never over the decode limit.
        let mut pixels_bound = 0;
        let limits = Limits { max_side, ..Default::default() };
        if let Ok(size) = limits.reference_size(&bytes) {
            let header = EncodedImage::new(&bytes, size);
            prop_assert!(header.width >= 1 && header.height >= 1);
            pixels_bound = (header.width as usize * header.height as usize * 8).min(MAX_DECODED_BYTES as usize);
            prop_assert!(header.width <= max_side && header.height <= max_side);
            if let Ok(decoded) = header.decode() {
                prop_assert_eq!((decoded.width(), decoded.height()), (header.width, header.height));
            }
        }
        let peak = PEAK.load(Relaxed).saturating_sub(base);
        // Plus the copy of the encoded bytes admission keeps and a decoder's own buffers.
        let bound = pixels_bound + 2 * bytes.len() + (4 << 20);
        prop_assert!(peak <= bound, "{} bytes allocated for {} input bytes", peak, bytes.len());
    }
}
